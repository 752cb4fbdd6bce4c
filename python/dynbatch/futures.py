"""Request futures that cost little to make and are completed once per batch.

``RequestFuture`` is a ``concurrent.futures.Future`` (``isinstance`` holds, and
``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` work with it), made
without the per-future lock and lists of the standard one: every future of a processor shares
one condition, so a batch's results are published under one lock and with one wake-up,
however many requests it holds. ``AsyncRequest`` carries an ``infer`` call's asyncio future;
a batch resolves those with one call into each event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

__all__ = ["AsyncRequest", "CompletionGroup", "RequestFuture", "claim", "complete"]

# The state names concurrent.futures uses (its waiters and helpers read them).
PENDING = "PENDING"
RUNNING = "RUNNING"
CANCELLED = "CANCELLED"
CANCELLED_AND_NOTIFIED = "CANCELLED_AND_NOTIFIED"
FINISHED = "FINISHED"
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class CompletionGroup:
    """The condition shared by one processor's futures."""

    __slots__ = ("condition",)

    def __init__(self) -> None:
        self.condition = threading.Condition()


class RequestFuture(Future[Any]):
    """The future of one ``submit``: the ``concurrent.futures.Future`` interface.

    ``cancel()`` succeeds until the request is dispatched (it then never reaches the model).
    """

    # Future has no __slots__; these make the per-request attributes cheap all the same.
    __slots__ = (
        "_callback_list",
        "_deadline_ns",
        "_exception",
        "_group",
        "_priority",
        "_request_id",
        "_result",
        "_sample",
        "_state",
        "_waiter_list",
    )

    def __init__(  # no super().__init__(): its lock and lists are what this class avoids
        self, group: CompletionGroup, request_id: int, priority: int, deadline_ns: int
    ) -> None:
        self._group = group
        self._request_id = request_id
        self._priority = priority
        self._deadline_ns = deadline_ns  # time.monotonic_ns() deadline; 0: none
        self._sample: Any = None  # kept alive until the core has copied it
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiter_list: list[Any] | None = None
        self._callback_list: list[Callable[[Future[Any]], object]] | None = None

    # What concurrent.futures' own methods and helpers (wait, as_completed) use.
    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        return self._group.condition

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

    @property
    def request_id(self) -> int:
        """The id that errors and stats use for this request."""
        return self._request_id

    def cancel(self) -> bool:
        """Cancels the request unless it is already running or done; never blocks on the
        processor. A cancelled request is dropped from its batch before the model runs."""
        with self._group.condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            # Notified at once: nothing else will pick this future up to notify it later.
            self._state = CANCELLED_AND_NOTIFIED
            self._sample = None
            for waiter in self._waiter_list or ():
                waiter.add_cancelled(self)
            self._group.condition.notify_all()
        self._run_callbacks()
        return True

    def result(self, timeout: float | None = None) -> Any:
        if self._state is not FINISHED:
            self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state is not FINISHED:
            self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        condition = self._group.condition
        with condition:
            # The condition is shared: wake-ups for other requests re-check this one.
            if not condition.wait_for(lambda: self._state in _DONE, timeout):
                raise TimeoutError(f"request {self._request_id} not done within {timeout} s")
        if self._state is not FINISHED:
            raise CancelledError()

    def _run_callbacks(self) -> None:
        callbacks = self._callback_list
        if callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<RequestFuture id={self._request_id} priority={self._priority} {self._state}>"


class AsyncRequest:
    """An ``infer`` call waiting in its event loop."""

    __slots__ = ("_deadline_ns", "_priority", "_request_id", "_sample", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        request_id: int,
        priority: int,
        deadline_ns: int,
    ) -> None:
        self.loop = loop
        self.future = future
        self._request_id = request_id
        self._priority = priority
        self._deadline_ns = deadline_ns
        self._sample: Any = None


# What claim() found for each request of a batch.
GONE = 0  # already ended by close(): not this batch's any more
LIVE = 1  # now running: it goes to the model
LATE = 2  # its timeout passed before dispatch
CANCELLED_BEFORE = 3  # cancelled while it waited


def claim(group: CompletionGroup, requests: list[Any], now_ns: int) -> list[int]:
    """Marks each live request running (cancel() fails from then on) and says, per request,
    what became of it. One lock for the whole batch."""
    states: list[int] = []
    append = states.append
    with group.condition:
        for request in requests:
            if request is None:
                append(GONE)
                continue
            request._sample = None  # copied into the batch: the core is done with it
            if type(request) is RequestFuture:
                if request._state is not PENDING:
                    append(CANCELLED_BEFORE)
                    continue
            elif request.future.cancelled():
                append(CANCELLED_BEFORE)
                continue
            if request._deadline_ns and now_ns > request._deadline_ns:
                append(LATE)
                continue
            if type(request) is RequestFuture:
                request._state = RUNNING
            append(LIVE)
    return states


def complete(
    group: CompletionGroup,
    requests: list[Any],
    results: list[Any] | None,
    errors: list[BaseException] | BaseException | None = None,
) -> int:
    """Ends each request with its result (``results``) or its error (``errors``: one per
    request, or one for all); returns how many ended now (others were already done).

    Sync futures are published under one lock with one notify; asyncio futures are resolved
    with one ``call_soon_threadsafe`` per event loop.
    """
    ended = 0
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
    with_callbacks: list[RequestFuture] = []
    with group.condition:
        for index, request in enumerate(requests):
            error = errors[index] if isinstance(errors, list) else errors
            value = results[index] if results is not None else None
            if type(request) is RequestFuture:
                if request._state in _DONE:
                    continue
                if error is None:
                    request._result = value
                else:
                    request._exception = error
                request._state = FINISHED
                request._sample = None
                if request._waiter_list:
                    for waiter in request._waiter_list:
                        if error is None:
                            waiter.add_result(request)
                        else:
                            waiter.add_exception(request)
                if request._callback_list:
                    with_callbacks.append(request)
            else:
                request._sample = None
                if request.future.done():
                    continue
                by_loop.setdefault(request.loop, []).append(
                    (request.future, error if error is not None else value, error is not None)
                )
            ended += 1
        group.condition.notify_all()
    for future in with_callbacks:
        future._run_callbacks()
    for loop, outcomes in by_loop.items():
        # A closed loop raises RuntimeError: nobody can await these any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, outcomes)
    return ended


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, outcome, failed in outcomes:
        if future.done():  # cancelled while the batch ran
            continue
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
