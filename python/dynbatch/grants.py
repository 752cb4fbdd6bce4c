"""The scheduler grants a thread holds, lent while it blocks on another processor's result.

A model runs under its processor's grant. A model that waits for another processor's future
(a pipeline: an embedder inside a reranker) would hold that grant while the inner processor
waits for one, and with one batch at a time on the device neither could go on. So a thread
that holds grants and blocks on a processor's future that is not done lends them (releases
them) for the wait and takes them back before it goes on: ``RequestFuture.result()`` and
``exception()``, ``concurrent.futures.wait`` and ``as_completed`` over such futures, and an
``infer`` awaited in an event loop that the grant-holding thread runs itself.

While a grant is lent, its batch's reservation is not counted: the inner batch may run next
to it (the outer batch's memory is already in use, so a budget read on the idle device sees it).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "Grant",
    "LendingEvent",
    "held",
    "hold",
    "lend_until_done",
    "lend_while_waiting",
    "lent",
    "take",
]


class Grant:
    """One grant a thread holds: how to give it back for a while and take it back."""

    __slots__ = ("_give", "_take_back", "key", "lent", "owner")

    def __init__(
        self,
        owner: object,
        key: tuple[int, int, int],
        give: Callable[[], None],
        take_back: Callable[[], bool],
    ) -> None:
        self.owner = owner  # the scheduler
        self.key = key  # what the owner's release names: task, priority, reservation
        self._give = give
        self._take_back = take_back
        self.lent = False  # released for a wait and not taken back (yet)

    def lend(self) -> None:
        self._give()
        self.lent = True

    def reclaim(self) -> None:
        """Takes the grant back; when that fails (the scheduler closed, the processor gave
        up) it stays lent, and its owner's release skips it."""
        if self._take_back():
            self.lent = False


class _AsyncLending:
    """Grants lent until every ``infer`` future of this episode is done."""

    __slots__ = ("grants", "waits")

    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants
        self.waits = 0


class _Local(threading.local):
    def __init__(self) -> None:
        self.grants: list[Grant] = []
        self.async_lending: _AsyncLending | None = None


_local = _Local()


def held() -> list[Grant]:
    """This thread's grants, oldest first (the list itself)."""
    return _local.grants


def hold(grant: Grant) -> None:
    _local.grants.append(grant)


def take(owner: object, key: tuple[int, int, int]) -> Grant | None:
    """Removes and returns this thread's grant from ``owner`` named ``key`` (None: the grant
    was taken on another thread). A grant released while lent is never taken back."""
    local = _local
    grants = local.grants
    for index in range(len(grants) - 1, -1, -1):
        if grants[index].owner is owner and grants[index].key == key:
            grant = grants.pop(index)
            lending = local.async_lending
            if lending is not None and grant in lending.grants:
                lending.grants.remove(grant)
                if not lending.grants:  # its futures may never be done (a closed loop)
                    local.async_lending = None
            return grant
    return None


@contextmanager
def lent() -> Iterator[None]:
    """Lends this thread's grants for the block and takes them back after it."""
    grants = [grant for grant in _local.grants if not grant.lent]
    for grant in reversed(grants):
        grant.lend()
    try:
        yield
    finally:
        for grant in grants:
            grant.reclaim()


def lend_until_done(future: asyncio.Future[Any]) -> None:
    """An ``infer`` from a thread that holds grants (a model running an event loop of its
    own): its grants are lent until every such request is done. The future's callbacks run
    on this loop, so the grants come back on the thread that lent them."""
    local = _local
    lending = local.async_lending
    if lending is None:
        grants = [grant for grant in local.grants if not grant.lent]
        if not grants:
            return
        for grant in reversed(grants):
            grant.lend()
        lending = local.async_lending = _AsyncLending(grants)
    lending.waits += 1
    future.add_done_callback(functools.partial(_async_wait_done, lending))


def _async_wait_done(lending: _AsyncLending, _: asyncio.Future[Any]) -> None:
    lending.waits -= 1
    if lending.waits:
        return
    local = _local
    if local.async_lending is lending:
        local.async_lending = None
    for grant in lending.grants:
        if grant in local.grants:  # not released meanwhile
            grant.reclaim()


class LendingEvent:
    """A ``concurrent.futures`` waiter's event: waiting on it lends this thread's grants."""

    __slots__ = ("_event",)

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        with lent():
            return self._event.wait(timeout)


def lend_while_waiting(waiter: Any) -> None:
    """``concurrent.futures.wait``/``as_completed`` installed ``waiter`` on a future: when
    this thread holds grants, its wait lends them."""
    if _local.grants and not isinstance(waiter.event, LendingEvent):
        waiter.event = LendingEvent(waiter.event)
