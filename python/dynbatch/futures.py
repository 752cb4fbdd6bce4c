"""Request futures that cost little to make and are completed once per batch.

``RequestFuture`` is a ``concurrent.futures.Future`` (``isinstance`` holds, and
``concurrent.futures.wait``/``as_completed`` and ``asyncio.wrap_future`` work with it), made
without the per-future lock and lists of the standard one: every future of a processor shares
one condition, and a batch's results are published as one ``BatchOutcome`` that each of its
futures points to, under one lock and with one wake-up, however many requests it holds.
``AsyncRequest`` carries an ``infer`` call's asyncio future; a batch resolves those with one
call into each event loop.

A thread holding a scheduler grant (a model running) that blocks on a future not yet done
lends its grants for the wait (``grants``): a pipeline of processors on one device runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from . import grants
from .logs import logger as _log

__all__ = [
    "AsyncRequest",
    "BatchOutcome",
    "CompletionGroup",
    "RequestFuture",
    "claim",
    "complete",
    "fail",
]


# The state names concurrent.futures uses (its waiters and helpers read them).
PENDING = "PENDING"
RUNNING = "RUNNING"
CANCELLED = "CANCELLED"
CANCELLED_AND_NOTIFIED = "CANCELLED_AND_NOTIFIED"
FINISHED = "FINISHED"
_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class CompletionGroup:
    """The condition shared by one processor's futures, and the worker thread that ends them
    (a wait on that thread for one of them could never end)."""

    __slots__ = ("condition", "worker")

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.worker: threading.Thread | None = None


class BatchOutcome:
    """The results of one model call, shared by the futures of its requests."""

    __slots__ = ("results",)

    def __init__(self, results: list[Any]) -> None:
        self.results = results


class RequestFuture(Future[Any]):
    """The future of one ``submit``: the ``concurrent.futures.Future`` interface.

    ``cancel()`` succeeds until the request is dispatched (it then never reaches the model).
    """

    # Future has no __slots__; these make the per-request attributes cheap all the same.
    __slots__ = (
        "_callback_list",
        "_deadline_ns",
        "_error",
        "_group",
        "_outcome",
        "_own_state",
        "_priority",
        "_request_id",
        "_row",
        "_sample",
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
        self._own_state = PENDING
        self._outcome: BatchOutcome | None = None  # set once: the request succeeded
        self._row = 0
        self._error: BaseException | None = None
        self._waiter_list: list[Any] | None = None
        self._callback_list: list[Callable[[Future[Any]], object]] | None = None

    # What concurrent.futures' own methods and helpers (wait, as_completed) use.
    @property
    def _state(self) -> str:
        return FINISHED if self._outcome is not None else self._own_state

    @_state.setter
    def _state(self, state: str) -> None:
        self._own_state = state

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        return self._group.condition

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        if self._waiter_list is None:
            self._waiter_list = _Waiters()
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

    @property
    def _result(self) -> Any:  # type: ignore[override]
        outcome = self._outcome
        return None if outcome is None else outcome.results[self._row]

    @property
    def _exception(self) -> BaseException | None:  # type: ignore[override]
        return self._error

    @property
    def request_id(self) -> int:
        """The id that errors and stats use for this request."""
        return self._request_id

    def cancel(self) -> bool:
        """Cancels the request unless it is already running or done; never blocks on the
        processor. A cancelled request is dropped from its batch before the model runs."""
        with self._group.condition:
            state = self._state
            if state in (RUNNING, FINISHED):
                return False
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            # Notified at once: nothing else will pick this future up to notify it later.
            # The sample stays: the core may still read it until the worker drops the request.
            self._own_state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiter_list or ():
                waiter.add_cancelled(self)
            self._group.condition.notify_all()
        self._run_callbacks()
        return True

    def result(self, timeout: float | None = None) -> Any:
        outcome = self._outcome
        if outcome is not None:  # the common case: done, no lock needed
            return outcome.results[self._row]
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._outcome is not None:
            return None
        self._wait(timeout)
        return self._error

    def _wait(self, timeout: float | None) -> None:
        condition = self._group.condition
        if self._group.worker is threading.current_thread() and self._state not in _DONE:
            raise RuntimeError(
                f"request {self._request_id} is waited for on its own processor's worker (in "
                "its model or a done-callback): it could never run"
            )
        waits = self._state not in _DONE and grants.held()
        with grants.lent() if waits else contextlib.nullcontext(), condition:
            # The condition is shared: wake-ups for other requests re-check this one.
            if not condition.wait_for(lambda: self._state in _DONE, timeout):
                raise TimeoutError(f"request {self._request_id} not done within {timeout} s")
        if self._state != FINISHED:
            raise CancelledError()

    def set_running_or_notify_cancel(self) -> bool:
        raise RuntimeError("a RequestFuture is run and completed by its processor")

    def set_result(self, result: Any) -> None:
        raise RuntimeError("a RequestFuture is run and completed by its processor")

    def set_exception(self, exception: BaseException | None) -> None:
        raise RuntimeError("a RequestFuture is run and completed by its processor")

    def _run_callbacks(self) -> None:
        if self._callback_list:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<RequestFuture id={self._request_id} priority={self._priority} {self._state}>"


class _Waiters(list[Any]):
    """A future's ``concurrent.futures`` waiters: installing one from a thread that holds
    grants makes its wait lend them."""

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        grants.lend_while_waiting(waiter)


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


def claim(
    group: CompletionGroup, table: dict[int, Any], ids: list[int], now_ns: int
) -> tuple[list[Any], list[Any], list[int] | None]:
    """Takes a batch's requests out of the table and marks the live ones running (cancel()
    fails from then on), under one lock. Returns the requests (None where close() ended one
    first), their samples, and the states of all when any request is not live (else None)."""
    pop = table.pop
    with group.condition:  # close() takes from the table under the same lock
        requests = [pop(request_id, None) for request_id in ids]
        samples: list[Any] = []
        states: list[int] | None = None
        for index, request in enumerate(requests):
            if request is None:
                samples.append(None)
                state = GONE
            else:
                samples.append(request._sample)
                request._sample = None  # copied into the batch: the core is done with it
                if type(request) is RequestFuture:
                    state = LIVE if request._own_state is PENDING else CANCELLED_BEFORE
                else:
                    state = CANCELLED_BEFORE if request.future.cancelled() else LIVE
                if state == LIVE and request._deadline_ns and now_ns > request._deadline_ns:
                    state = LATE
                if state == LIVE and type(request) is RequestFuture:
                    request._own_state = RUNNING
            if state != LIVE and states is None:
                states = [LIVE] * index
            if states is not None:
                states.append(state)
    return requests, samples, states


def complete(group: CompletionGroup, requests: list[Any], results: list[Any]) -> None:
    """Ends each (running) request with its row of ``results``: one lock, one notify, one
    hand-off per event loop, and per request only two attribute writes. A request already
    failed (abandoned by close) keeps its error."""
    outcome = BatchOutcome(results)
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
    notify: list[RequestFuture] = []
    with group.condition:
        for row, request in enumerate(requests):
            if type(request) is RequestFuture:
                if request._own_state is FINISHED:  # failed meanwhile (close abandoned it)
                    continue
                request._row = row
                request._outcome = outcome
                if request._waiter_list or request._callback_list:
                    notify.append(request)
            else:
                by_loop.setdefault(request.loop, []).append((request.future, results[row], False))
        for future in notify:
            for waiter in future._waiter_list or ():
                waiter.add_result(future)
        group.condition.notify_all()
    _after(notify, by_loop)


def fail(
    group: CompletionGroup, requests: list[Any], errors: list[BaseException] | BaseException
) -> int:
    """Ends each request not yet done with its error (one per request, or one for all);
    returns how many it ended."""
    ended = 0
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]] = {}
    notify: list[RequestFuture] = []
    with group.condition:
        for index, request in enumerate(requests):
            error = errors[index] if isinstance(errors, list) else errors
            request._sample = None
            if type(request) is RequestFuture:
                if request._state in _DONE:
                    continue
                request._error = error
                request._own_state = FINISHED
                if request._waiter_list or request._callback_list:
                    notify.append(request)
                for waiter in request._waiter_list or ():
                    waiter.add_exception(request)
            else:
                if request.future.done():
                    continue
                by_loop.setdefault(request.loop, []).append((request.future, error, True))
            ended += 1
        group.condition.notify_all()
    _after(notify, by_loop)
    return ended


def _after(
    notify: list[RequestFuture],
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, bool]]],
) -> None:
    """Outside the lock: done-callbacks, and one hand-off into each event loop. A callback
    that raises anything (even BaseException) is logged; the others still run."""
    for future in notify:
        try:
            future._run_callbacks()
        except BaseException:  # a callback must not stop the batch's other completions
            _log.exception("a done-callback of request %d raised", future._request_id)
    for loop, outcomes in by_loop.items():
        # A closed loop raises RuntimeError: nobody can await these any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, outcomes)


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, bool]]) -> None:
    for future, outcome, failed in outcomes:
        if future.done():  # cancelled while the batch ran
            continue
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
