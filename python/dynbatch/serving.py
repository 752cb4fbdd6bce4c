"""The serving side of a processor: requests from any thread, batches through the model.

Request path (the caller's thread, the GIL held throughout, O(1) Python work per request):
check the sample against the first one, make its future, note it in the request table, hand
its id and leaf addresses to the core. Batch path (one worker thread per processor): wait for
the core's next batch with the GIL released, take its requests out of the table, drop the
cancelled and the late, run the model under the scheduler's grant, split the output, and
publish every result with one lock and one wake-up (one call per event loop for ``infer``).

Every request ends exactly once: whoever takes its id out of the table (the worker, or
``close``) ends it, and a future that is already done is never touched again.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import math
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import _core, grants
from .engine import Engine
from .errors import (
    DynbatchError,
    InvalidSampleError,
    ProcessorClosed,
    QueueFull,
    RequestTimeout,
)
from .futures import (
    CANCELLED_BEFORE,
    LATE,
    LIVE,
    AsyncRequest,
    CompletionGroup,
    RequestFuture,
    claim,
    complete,
    fail,
)
from .logs import Throttled
from .logs import logger as _log
from .scheduler import Scheduler
from .torch_bridge import LeafSpec, Schema, split_outputs, storage_of

__all__ = ["Server"]

_INT32 = (-(2**31), 2**31 - 1)
_live_servers: weakref.WeakSet[Server] = weakref.WeakSet()


def _close_live_servers() -> None:
    """At interpreter exit no worker may still run: a daemon thread that comes back to Python
    during finalization is ended by a forced unwind, which torch's C++ frames turn into
    std::terminate. Close them all, then give batches in the model 5 s in all to return."""
    servers = list(_live_servers)
    deadline = time.monotonic() + 5.0
    for server in servers:
        server.close(drain=False, timeout=5.0)
    for server in servers:
        server.join(max(deadline - time.monotonic(), 0.0))


atexit.register(_close_live_servers)


def _disown_servers_after_fork() -> None:
    """In a forked child, every live server is the parent's: it refuses requests, and the
    child's copies of the parent's pending futures end with ProcessorForked."""
    servers = list(_live_servers)
    _live_servers.clear()
    for server in servers:
        server.disown()


os.register_at_fork(after_in_child=_disown_servers_after_fork)


def _check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if not _INT32[0] <= priority <= _INT32[1]:
        raise ValueError(f"priority must fit in 32 bits, got {priority}")
    return int(priority)


def _timeout_ns(timeout: object, name: str = "timeout") -> int:
    """Nanoseconds, or -1 for none."""
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(timeout).__name__}")
    if not timeout >= 0 or math.isinf(timeout):
        if math.isinf(timeout) and timeout > 0:
            return -1
        raise ValueError(f"{name} must be >= 0 seconds, got {timeout}")
    return min(int(timeout * 1e9), 2**62)


class Server:
    """Everything ``submit``/``infer`` need, created by the processor on first use."""

    def __init__(
        self,
        engine: Engine,
        model: Callable[[Any], Any],
        *,
        max_delay_ms: float,
        max_queue_size: int,
        block_timeout: float | None,
        isolate_errors: bool,
        aging_ms: float,
        scheduler: Scheduler | None,
        task_priority: int,
    ) -> None:
        self._engine = engine
        self._model = model
        engine.note_model(model)
        self._max_delay_ms = max_delay_ms
        self._max_queue_size = max_queue_size
        self._block_timeout_ns = _timeout_ns(block_timeout, "block_timeout")
        self._isolate = isolate_errors
        self._aging_ms = aging_ms
        device = None if engine.target is None else engine.target.device
        self._scheduler = scheduler if scheduler is not None else Scheduler.shared(device)
        self._task = Scheduler.new_task_id()
        self._task_priority = task_priority
        self._group = CompletionGroup()
        self._table: dict[int, Any] = {}
        self._ids = itertools.count()
        self._schema: Schema | None = None
        self._lone_tensor: LeafSpec | None = None  # the schema's one leaf, for the fast path
        self._former: _core.BatchFormer | None = None
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closing = False
        self._fatal: BaseException | None = None
        self._abandoned = False  # closed without draining: waiting batches give up
        self._running: list[Any] | None = None  # the requests of the batch being dispatched
        self._started_ns = 0
        self.isolated_errors = 0
        self._shed_full = Throttled("requests refused: the queue was full (max_queue_size)")
        self._shed_late = Throttled("requests timed out before dispatch")
        self._failed_alone = Throttled("requests failed alone (isolated model errors)")
        _live_servers.add(self)

    # ----------------------------------------------------------------- request path

    def submit(self, sample: Any, priority: int, timeout: float | None) -> RequestFuture:
        if priority.__class__ is not int or not -2147483648 <= priority <= 2147483647:
            priority = _check_priority(priority)
        timeout_ns = -1 if timeout is None else _timeout_ns(timeout)
        former = self._former if self._former is not None else self._start(sample)
        request_id = next(self._ids)
        future = RequestFuture(
            self._group,
            request_id,
            priority,
            0 if timeout_ns < 0 else time.monotonic_ns() + timeout_ns,
        )
        # The lone-tensor check inlined: this is the per-request path.
        spec = self._lone_tensor
        if (
            spec is not None
            and sample.__class__ is torch.Tensor
            and sample.dtype is spec.dtype
            and sample.shape == spec.shape
            and sample.is_cpu
            and sample.layout is torch.strided
            and sample.is_contiguous()
            and not sample.is_neg()
        ):
            future._sample = sample.untyped_storage()
            self._table[request_id] = future
            if former.submit_one(request_id, sample.data_ptr(), priority, timeout_ns):
                return future
            addresses, length = [sample.data_ptr()], 0
        else:
            addresses = []
            lengths: list[int] = []
            future._sample = self._admit(sample, request_id, addresses, lengths)
            self._table[request_id] = future
            length = lengths[0] if lengths else 0
            if former.submit(request_id, addresses, priority, timeout_ns, length):
                return future
        self._push_refused(former, request_id, addresses, priority, timeout_ns, length)
        return future

    def submit_many(
        self, samples: Iterable[Any], priority: int, timeout: float | None
    ) -> list[RequestFuture]:
        priority = _check_priority(priority)
        timeout_ns = _timeout_ns(timeout)
        samples = list(samples)
        if not samples:
            return []
        former = self._former if self._former is not None else self._start(samples[0])
        deadline = time.monotonic_ns() + timeout_ns if timeout_ns >= 0 else 0
        group = self._group
        ids = [next(self._ids) for _ in samples]
        futures = [RequestFuture(group, request_id, priority, deadline) for request_id in ids]
        # All checked before any is queued.
        addresses, lengths = self._check_all(samples, ids, futures)
        table = self._table
        table.update(zip(ids, futures, strict=True))
        leaves = len(addresses) // len(ids)
        accepted = former.submit_many(ids, addresses, priority, timeout_ns, lengths)
        room_deadline = self._room_deadline()
        while accepted < len(ids) and self._wait_for_room(former, room_deadline):
            accepted += former.submit_many(
                ids[accepted:],
                addresses[accepted * leaves :],
                priority,
                timeout_ns,
                lengths[accepted:],
            )
        if accepted < len(ids):  # each refused request ends with its own error
            refused = futures[accepted:]  # not from the table: close() may have emptied it
            for request_id in ids[accepted:]:
                table.pop(request_id, None)
            fail(self._group, list(refused), self._refusal(len(refused)))
        return futures

    def infer(self, sample: Any, priority: int, timeout: float | None) -> asyncio.Future[Any]:
        """The request's asyncio future: awaiting it needs no task of its own, and a batch
        resolves its futures with one call into each event loop."""
        priority = _check_priority(priority)
        timeout_ns = _timeout_ns(timeout)
        loop = asyncio.get_running_loop()  # raises outside a running loop, as asyncio does
        former = self._former if self._former is not None else self._start(sample)
        request_id = next(self._ids)
        deadline = time.monotonic_ns() + timeout_ns if timeout_ns >= 0 else 0
        request = AsyncRequest(loop, loop.create_future(), request_id, priority, deadline)
        addresses: list[int] = []
        lengths: list[int] = []
        request._sample = self._admit(sample, request_id, addresses, lengths)
        self._table[request_id] = request
        length = lengths[0] if lengths else 0
        if former.submit(request_id, addresses, priority, timeout_ns, length):
            grants.lend_until_done(request.future)  # awaited inside a model: see grants
            return request.future
        if self._closing or self._block_timeout_ns < 0:
            self._table.pop(request_id, None)
            raise self._refusal()
        return asyncio.ensure_future(
            self._submit_when_room(former, request, addresses, priority, timeout_ns, length)
        )

    async def _submit_when_room(
        self,
        former: _core.BatchFormer,
        request: AsyncRequest,
        addresses: list[int],
        priority: int,
        timeout_ns: int,
        length: int,
    ) -> Any:
        """Waits for room off the event loop (the loop keeps serving meanwhile)."""
        room_deadline = self._room_deadline()
        queued = False
        try:
            while not former.submit(request._request_id, addresses, priority, timeout_ns, length):
                if not await request.loop.run_in_executor(
                    None, self._wait_for_room, former, room_deadline
                ):
                    raise self._refusal()
            queued = True
        finally:
            if not queued:  # refused, or the awaiting task was cancelled while waiting
                self._table.pop(request._request_id, None)
                request.future.cancel()
        return await request.future

    def _check_all(
        self, samples: list[Any], ids: list[int], futures: list[RequestFuture]
    ) -> tuple[list[int], list[int]]:
        """Checks every sample (the lone-tensor check inlined), keeps each in its future, and
        returns their leaf addresses, request-major, and (padding) their lengths."""
        addresses: list[int] = []
        lengths: list[int] = []
        append = addresses.append
        spec = self._lone_tensor
        if spec is None:
            for request_id, sample, future in zip(ids, samples, futures, strict=True):
                future._sample = self._admit(sample, request_id, addresses, lengths)
            return addresses, lengths
        dtype, shape, tensor_type, strided = spec.dtype, spec.shape, torch.Tensor, torch.strided
        for request_id, sample, future in zip(ids, samples, futures, strict=True):
            if (
                sample.__class__ is tensor_type
                and sample.dtype is dtype
                and sample.shape == shape
                and sample.is_cpu
                and sample.layout is strided
                and sample.is_contiguous()
                and not sample.is_neg()
            ):
                append(sample.data_ptr())
                future._sample = sample.untyped_storage()
            else:
                future._sample = self._admit(sample, request_id, addresses)
        return addresses, lengths

    def _admit(
        self, sample: Any, request_id: int, addresses: list[int], lengths: list[int] | None = None
    ) -> Any:
        assert self._schema is not None
        try:
            return storage_of(self._schema.admit(sample, request_id, addresses, lengths))
        except InvalidSampleError as error:
            raise type(error)(error.index, error.path, error.problem, noun="request") from None

    def _start(self, first: Any) -> _core.BatchFormer:
        """The first request fixes the structure every later one must share."""
        with self._start_lock:
            if self._closing:
                raise self._refusal()
            if self._former is not None:
                return self._former
            try:
                schema = self._engine.schema_for(first)
            except InvalidSampleError as error:
                raise type(error)(error.index, error.path, error.problem, noun="request") from None
            former = self._engine.former_for(
                schema,
                self._max_queue_size,
                max_delay_ms=self._max_delay_ms,
                aging_ms=self._aging_ms,
                # collate="pad" without a window: what is queued is grouped by length, and a
                # request joins only where its padding costs less than a batch of its own.
                group_queued=self._engine.options.group_by_length,
            )
            self._schema = schema
            self._lone_tensor = schema.leaves[0] if schema.fast_path else None
            self._worker = threading.Thread(
                target=self._work, args=(former,), name="dynbatch-worker", daemon=True
            )
            # Ends requests whose deadline passes while the worker is in the model; it sleeps
            # in the core and wakes only at a deadline.
            self._watcher = threading.Thread(
                target=self._watch, args=(former,), name="dynbatch-deadlines", daemon=True
            )
            self._former = former
            self._started_ns = time.perf_counter_ns()
            self._engine.note_worker_thread()
            self._worker.start()
            self._watcher.start()
            return former

    def _push_refused(
        self,
        former: _core.BatchFormer,
        request_id: int,
        addresses: list[int],
        priority: int,
        timeout_ns: int,
        length: int,
    ) -> None:
        """The core refused a request: wait for room when allowed, else raise."""
        room_deadline = self._room_deadline()
        while self._wait_for_room(former, room_deadline):
            if former.submit(request_id, addresses, priority, timeout_ns, length):
                return
        self._table.pop(request_id, None)  # the caller gets the error instead of a future
        raise self._refusal()

    def _room_deadline(self) -> int:
        """When a caller waiting for room gives up (time.monotonic_ns); 0: it does not wait.
        A done-callback on the worker never waits: only the worker makes room."""
        if self._block_timeout_ns < 0 or self._on_worker():
            return 0
        return time.monotonic_ns() + self._block_timeout_ns

    def _on_worker(self) -> bool:
        worker = self._worker
        return worker is not None and worker.ident == threading.get_ident()

    def _wait_for_room(self, former: _core.BatchFormer, deadline_ns: int) -> bool:
        """Sleeps (GIL released) until a request may fit; False once `deadline_ns` passed."""
        remaining_ns = deadline_ns - time.monotonic_ns()
        if self._closing or deadline_ns == 0 or remaining_ns <= 0:
            return False
        return bool(former.wait_for_room(remaining_ns / 1e9)) and not self._closing

    def _refusal(self, count: int = 1) -> DynbatchError:
        if self._engine.forked():
            return self._engine.forked_error()
        if self._fatal is not None:
            error = ProcessorClosed(f"the processor stopped after an internal error: {self._fatal}")
            error.__cause__ = self._fatal
            return error
        if self._closing:
            return ProcessorClosed("this DynamicBatchProcessor is closed")
        if self._block_timeout_ns < 0:
            waited = ""
        elif self._on_worker():
            waited = (
                " (not waiting for room: this done-callback runs on the processor's worker, "
                "which is the one that makes room)"
            )
        else:
            waited = f" after waiting {self._block_timeout_ns / 1e9:g} s"
        self._shed_full.add(count)
        return QueueFull(
            f"{self._max_queue_size} requests are already waiting (max_queue_size){waited}"
        )

    # ------------------------------------------------------------------- batch path

    def _work(self, former: _core.BatchFormer) -> None:
        self._group.worker = threading.current_thread()  # see RequestFuture.result
        try:
            while True:
                batch = former.next_batch()
                if batch is None:
                    former.close()  # drained (or closed): the deadline watcher stops too
                    return
                if batch.expired:
                    self._expire(batch.expired)
                if batch.size:
                    self._dispatch(batch)
        except BaseException as error:  # the core failed: every waiting request learns why
            self._fatal = error
            self._closing = True
            _log.error("dynbatch worker stopped: %s", error)
            former.close()
            self._fail_waiting(ProcessorClosed(f"the processor stopped: {error}"), error)

    def _expire(self, ids: list[int]) -> None:
        pop = self._table.pop
        with self._group.condition:  # close() takes from the table under the same lock
            late = [request for request in (pop(i, None) for i in ids) if request is not None]
        self._end_late(late)

    def _watch(self, former: _core.BatchFormer) -> None:
        """The deadline watcher: requests never formed (expired; the core counted them) and
        requests in a batch formed ahead but not yet dispatched (late; counted here, and the
        worker drops them from their batch: they are no longer in the table)."""
        try:
            while (found := former.wait_late()) is not None:
                # Handled in calls, so that no request stays referenced while this thread
                # sleeps: a request's error, once raised to its caller, holds the caller's
                # frames (and all they reference) until the request is freed.
                if found[0]:
                    self._expire(found[0])
                if found[1]:
                    self._expire_in_batch(found[1])
        except BaseException as error:  # the worker still serves; deadlines then wait for it
            _log.error("dynbatch deadline watcher stopped: %s", error)

    def _expire_in_batch(self, ids: list[int]) -> None:
        pop = self._table.pop
        with self._group.condition:
            late = [request for request in (pop(i, None) for i in ids) if request is not None]
        for priority, count in Counter(r._priority for r in late).items():
            self._engine.recorder.record_outcome(priority, "timed_out", count)
        self._end_late(late)

    def _end_late(self, late: list[Any]) -> None:
        self._shed_late.add(len(late))
        errors: list[BaseException] = [
            RequestTimeout(f"request {r._request_id} timed out before dispatch") for r in late
        ]
        fail(self._group, late, errors)

    def _dispatch(self, batch: _core.Batch) -> None:
        self._engine.note_target(batch.target)
        requests, samples, states = claim(self._group, self._table, batch.ids, time.monotonic_ns())
        if self._former is not None:  # deadline releases allow for this delay
            self._former.report_dispatch(batch.released_ns)
        live = (
            requests
            if states is None
            else [r for r, s in zip(requests, states, strict=True) if s == LIVE]
        )
        self._running = live  # what close() abandons while the model has it
        try:
            assert self._schema is not None
            if states is None:  # every request is live: the common case
                leaves = self._engine.to_device(self._schema.batch_leaves(batch, samples), batch)
                self._run(leaves, requests, batch.sequence, batch.collate_ns)
                return
            self._account(requests, states)
            keep = [i for i, state in enumerate(states) if state == LIVE]
            if keep:
                leaves = self._schema.batch_leaves(batch, [samples[i] for i in keep], rows=keep)
                self._run(
                    self._engine.to_device(leaves, batch), live, batch.sequence, batch.collate_ns
                )
        except BaseException as error:  # anything past the claim: these requests get it
            _log.exception("dynbatch batch of %d requests failed outside the model", len(live))
            fail(self._group, live, error)
        finally:
            self._running = None

    def _account(self, requests: list[Any], states: list[int]) -> None:
        """Ends the late requests of a batch and counts its cancelled ones."""
        late = [r for r, state in zip(requests, states, strict=True) if state == LATE]
        if late:
            self._end_late(late)
            for priority, count in Counter(r._priority for r in late).items():
                self._engine.recorder.record_outcome(priority, "timed_out", count)
        cancelled = [r for r, s in zip(requests, states, strict=True) if s == CANCELLED_BEFORE]
        for priority, count in Counter(r._priority for r in cancelled).items():
            self._engine.recorder.record_outcome(priority, "cancelled", count)

    def _run(self, leaves: list[Any], requests: list[Any], sequence: int, collate_ns: int) -> None:
        """Runs the model on one batch (or part: its times add to batch ``sequence``'s) and
        ends its requests; splits on OOM, bisects on other errors when isolating them."""
        engine = self._engine
        size = len(requests)
        assert self._schema is not None and self._former is not None
        reservation = self._reservation(size)
        scheduler = self._scheduler
        if not scheduler.acquire(
            self._task, self._task_priority, reservation, lambda: self._abandoned
        ):
            why = "closed without draining" if self._abandoned else "its scheduler was closed"
            fail(self._group, requests, ProcessorClosed(f"the processor was {why}"))
            return
        if self._abandoned:  # closed while this batch waited: close() no longer waits for it
            scheduler.release(self._task, self._task_priority, reservation)
            fail(self._group, requests, ProcessorClosed("the processor was closed"))
            return
        failure: BaseException | None = None
        output: Any = None
        try:
            engine.memory.begin()
            started = engine.clock()
            try:
                output = self._model(self._schema.structure(leaves))
            except BaseException as error:
                failure = error
            elapsed = engine.clock() - started
            peak_bytes, reclaimable_bytes = engine.memory.end()
        finally:
            # With more queued the task keeps the device while this batch is finished.
            more = self._former.backlog > 0
            scheduler.release(self._task, self._task_priority, reservation, more=more)
        if failure is None:
            feedback = _core.BatchFeedback(
                size,
                compute_ns=elapsed,
                collate_ns=collate_ns,
                peak_memory_bytes=peak_bytes,
                reclaimable_bytes=reclaimable_bytes,
                bucket=self._former.bucket,
            )
            self._former.report_feedback(sequence, feedback)
            try:
                results = split_outputs(output, size)
            except Exception as error:  # the model broke its contract for the whole batch
                fail(self._group, requests, error)
                return
            complete(self._group, requests, results)
            return
        if engine.is_out_of_memory(failure):
            self._split_after_oom(leaves, requests, sequence, failure)
            return
        if self._isolate and size > 1 and isinstance(failure, Exception):
            half = -(-size // 2)
            self._run([leaf[:half] for leaf in leaves], requests[:half], sequence, 0)
            self._run([leaf[half:] for leaf in leaves], requests[half:], sequence, 0)
            return
        ended = fail(self._group, requests, failure)
        if self._isolate and size == 1 and ended:
            self.isolated_errors += 1
            engine.recorder.record_outcome(requests[0]._priority, "failed", 1)
            self._failed_alone.add(1, f"request {requests[0]._request_id}: {failure!r}")

    def _split_after_oom(
        self, leaves: list[Any], requests: list[Any], sequence: int, error: BaseException
    ) -> None:
        assert self._former is not None
        size = len(requests)
        chunk = self._engine.after_oom(size, self._former.bucket, self._former.sample_bytes)
        if chunk is None:
            alone = DynbatchError(
                f"request {requests[0]._request_id} alone does not fit in memory; "
                "it cannot be split further"
            )
            alone.__cause__ = error
            fail(self._group, requests, alone)
            return
        for start in range(0, size, chunk):
            part = [leaf[start : start + chunk] for leaf in leaves]
            self._run(part, requests[start : start + chunk], sequence, 0)

    def _reservation(self, size: int) -> int:
        """The batch's predicted peak memory, for the scheduler; exclusive while unknown."""
        state = self._engine.policy.state()
        m0, m1 = float(state["memory_intercept_bytes"]), float(state["memory_slope_bytes"])
        if m0 <= 0.0 and m1 <= 0.0:
            return int(_core.DeviceScheduler.exclusive)
        return max(0, int(m0 + m1 * size))

    # --------------------------------------------------------------------- shutdown

    def close(self, drain: bool, timeout: float | None) -> None:
        """Stops taking requests; finishes (drain) or fails (no drain) those waiting.

        ``timeout`` bounds the whole wait. Past it, or without drain, close() does not wait
        for the model: every request not done ends with ProcessorClosed, those of a batch in
        the model included (the call runs to its end in the background and its output is
        discarded; a hung call keeps the worker thread, nothing else). From a done-callback on
        the worker, drain stops the input and returns at once: the worker runs what is queued
        once the callback returns, then stops."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        with self._start_lock:
            self._closing = True
        _live_servers.discard(self)
        former, worker, watcher = self._former, self._worker, self._watcher
        if former is None or worker is None:
            return
        here = threading.current_thread()
        if drain:
            former.close_input()
            if worker is here:
                return
            worker.join(remaining())
        self._abandoned = True  # a batch waiting for its scheduler grant gives up
        former.close()  # nothing more is formed; undelivered batches are dropped
        running = self._running
        if running:  # in the model (or about to be): abandoned, not waited for
            fail(
                self._group,
                running,
                ProcessorClosed(
                    "the processor was closed while this request's batch was in "
                    "the model: it was abandoned, its output is discarded"
                ),
            )
        elif worker is not here:
            worker.join(remaining())  # not in the model: it stops at once
        if watcher is not None and watcher is not here:
            watcher.join(remaining())  # former.close() woke it
        self._fail_waiting(ProcessorClosed("the processor was closed before this request ran"))

    def join(self, timeout: float) -> None:
        """Waits up to ``timeout`` for the worker and the deadline watcher to end (after
        close(); a model call abandoned by close() keeps the worker until it returns)."""
        deadline = time.monotonic() + timeout
        for thread in (self._worker, self._watcher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))

    def release(self) -> None:
        """The processor was dropped without close(): no more requests; the worker runs what
        is queued and stops on its own, and this server is freed when it has. Never waits (it
        runs as a finalizer, on whichever thread dropped the processor)."""
        if self._closing:
            return
        self._closing = True
        former = self._former
        if former is not None:
            former.close_input()

    def disown(self) -> None:
        """In a forked child: the worker, the core and the requests are the parent's. New
        requests are refused (ProcessorForked); the child's copies of the pending futures end
        with it; nothing of the parent's is joined, woken or locked (the core leaks it)."""
        self._closing = True
        self._start_lock = threading.Lock()  # a parent thread may have held them at the fork
        self._group.condition = threading.Condition()
        self._former = None  # released: the core leaks an inherited former
        with self._group.condition:
            waiting = list(self._table.values())
            self._table.clear()
        fail(self._group, waiting + (self._running or []), self._engine.forked_error())

    def _fail_waiting(self, error: DynbatchError, cause: BaseException | None = None) -> None:
        with self._group.condition:
            waiting = list(self._table.values())
            self._table.clear()
        if waiting:
            _log.warning("%d requests not run: %s", len(waiting), error)
        if cause is not None:
            error.__cause__ = cause
        fail(self._group, waiting, error)

    def queued(self) -> int:
        return 0 if self._former is None else int(self._former.queued)

    def active_ns(self) -> int:
        if self._former is None or self._closing:
            return 0
        return time.perf_counter_ns() - self._started_ns
