"""DynamicBatchProcessor: batches whose size follows the caller's speed and the memory headroom."""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from . import _core
from .devices import default_telemetry
from .errors import DynbatchError, ProcessorClosed
from .logs import logger
from .memory import MemoryMonitor, default_memory_monitor
from .progress import ProgressBar, total_of
from .scheduler import Scheduler
from .serving import Server
from .stats import Stats
from .torch_bridge import Schema, split_outputs

__all__ = ["BatchIterator", "DynamicBatchProcessor"]

# Samples are handed to the core in chunks this size, so collation of the first batch can
# start while the rest of the read-ahead is still being read.
_PUSH_CHUNK = 16


_GPU_UTILIZATION_TARGET = 0.8
# Samples read ahead are tracked in fixed tables: this bounds their size (and rows fit 32 bits).
_MAX_READ_AHEAD = 2**22
_OOM_EVENTS_KEPT = 1024


def _check_fraction(name: str, value: object, *, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 < value <= 1.0 if inclusive else 0.0 < value < 1.0):
        bounds = "(0, 1]" if inclusive else "(0, 1)"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _check_padding(
    collate: object, pad_value: object, pad_to_multiple_of: object
) -> tuple[float | None, int]:
    """(pad value, or None to stack; the padded length's multiple)."""
    if collate not in ("stack", "pad"):
        raise ValueError(f"collate must be 'stack' or 'pad', got {collate!r}")
    if not isinstance(pad_value, (bool, int, float)):
        raise TypeError(f"pad_value must be a number, got {type(pad_value).__name__}")
    if pad_to_multiple_of is not None:
        if collate != "pad":
            raise ValueError("pad_to_multiple_of needs collate='pad'")
        _check_size("pad_to_multiple_of", pad_to_multiple_of)
    multiple = pad_to_multiple_of if isinstance(pad_to_multiple_of, int) else 1
    return (pad_value if collate == "pad" else None), multiple


def _check_serving_arguments(
    model: object,
    max_delay_ms: object,
    max_queue_size: object,
    block_timeout: object,
    isolate_errors: object,
    priority_aging_ms: object,
    scheduler: object,
    task_priority: object,
) -> None:
    if model is not None and not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    for name, value, low, high in (
        ("max_delay_ms", max_delay_ms, 0.0, 3.6e6),
        ("priority_aging_ms", priority_aging_ms, 1e-3, 3.6e6),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of milliseconds, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value}")
    _check_size("max_queue_size", max_queue_size)
    if block_timeout is not None:
        if isinstance(block_timeout, bool) or not isinstance(block_timeout, (int, float)):
            raise TypeError(
                f"block_timeout must be seconds or None, got {type(block_timeout).__name__}"
            )
        if not block_timeout >= 0:
            raise ValueError(f"block_timeout must be >= 0 seconds, got {block_timeout}")
    if not isinstance(isolate_errors, bool):
        raise TypeError(f"isolate_errors must be a bool, got {type(isolate_errors).__name__}")
    if scheduler is not None and not isinstance(scheduler, Scheduler):
        raise TypeError(f"scheduler must be a dynbatch.Scheduler, got {type(scheduler).__name__}")
    if isinstance(task_priority, bool) or not isinstance(task_priority, int):
        raise TypeError(f"task_priority must be an int, got {type(task_priority).__name__}")
    if not -(2**31) <= task_priority < 2**31:
        raise ValueError(f"task_priority must fit in 32 bits, got {task_priority}")


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


class DynamicBatchProcessor:
    """Forms batches from an iterable of samples, sizing each batch from what it learns.

    ``for batch in processor(samples)`` yields batches in input order; every sample lands in
    exactly one batch, and each batch holds between ``min_batch_size`` and ``max_batch_size``
    samples except possibly the last (and the parts of a batch split after running out of
    memory). ``processor.map(fn, samples)`` runs ``fn`` on every batch and returns one result
    per sample, splitting and retrying batches that run out of memory.

    The size comes from cost models learned per input shape (latency ``a + b*n`` from the
    caller's time per batch, peak memory ``m0 + m1*n`` from torch's allocator on a GPU): the
    largest size that fits the free memory, meets ``latency_slo_ms`` and is not past the
    throughput knee, below a ceiling lowered by every out-of-memory error. With no size
    arguments it starts at 1 and grows until it has found the knee. The core collates the next
    batch while the caller works on the current one.

    Args:
        max_batch_size: the largest batch (default 1024).
        min_batch_size: the smallest batch, except a last one (default 1).
        latency_slo_ms: keep a batch's predicted compute time within this (default none).
        oom_errors: exception types that mean "out of memory", besides
            ``torch.cuda.OutOfMemoryError`` (e.g. a simulated one in tests).
        prefetch: batches prepared ahead of the caller (default 1).
        memory_fraction: before a memory model exists, the share of available memory the
            staged bytes of one batch may take.
        knee_tolerance: how close to its ceiling throughput must be to stop growing (0.05).
        telemetry: a ``dynbatch._core.Telemetry`` to read memory from (default: NVML for the
            current CUDA device when usable, host memory otherwise, sampled every 50 ms by a
            core thread). One passed in is not closed by ``close()``.
        clock: nanoseconds now (default ``time.perf_counter_ns``); simulations inject one.
        memory_monitor: per-batch memory feedback (default: torch's CUDA allocator when CUDA
            is available, none otherwise); simulations inject one.
        collate: ``"stack"`` (default; every sample's leaves share their shapes) or ``"pad"``:
            tensor leaves may differ in their first dimension and are padded to the longest
            in the batch with ``pad_value``; batches are then ``PaddedBatch`` objects
            (``.data``, ``.lengths``, ``.mask``, ``.indices``). All padded leaves of one sample
            share their length. With ``pad_to_multiple_of``, every batch's padded length is a
            multiple of it. ``bucket_window=N`` groups samples of similar length from the next
            N waiting (batches then come out of input order: ``.indices`` says which samples
            they hold; ``map`` returns results in input order). ``max_tokens=T`` caps a batch
            by its padded size (samples x padded length); a sample longer than that alone is
            an ``InvalidSampleError``.

    Serving (``submit``, ``submit_many``, ``infer``; needs ``model``):
        model: the callable run on each batch; its output (a tensor, or dicts/tuples/lists of
            tensors) is split along the first dimension into per-request results.
        max_delay_ms: the longest a request waits for its batch to fill (default 5): a short
            queue is dispatched after this, a long one fills the target size at once, and a
            partial batch keeps growing while the model is busy. 0 dispatches at once.
        max_queue_size: requests waiting at most (default 65536); beyond it ``submit`` raises
            ``QueueFull`` at once, or after waiting ``block_timeout`` seconds for room.
        isolate_errors: when the model raises on a batch, bisect it so that only the
            request(s) causing the error get it, as their own exception (default True).
        priority_aging_ms: a waiting request gains one priority level per this (default 100),
            so low priorities are delayed by a saturating high-priority stream, not starved.
        scheduler: the ``Scheduler`` that orders this task's batches against other tasks on
            the device (default: the device's shared one); ``task_priority`` ranks this task.
    """

    def __init__(
        self,
        max_batch_size: int = 1024,
        min_batch_size: int = 1,
        *,
        latency_slo_ms: float | None = None,
        oom_errors: tuple[type[BaseException], ...] = (),
        prefetch: int = 1,
        memory_fraction: float = 0.25,
        knee_tolerance: float = 0.05,
        telemetry: _core.Telemetry | None = None,
        clock: Callable[[], int] | None = None,
        memory_monitor: MemoryMonitor | None = None,
        collate: str = "stack",
        pad_value: float = 0,
        pad_to_multiple_of: int | None = None,
        bucket_window: int | None = None,
        max_tokens: int | None = None,
        model: Callable[[Any], Any] | None = None,
        max_delay_ms: float = 5.0,
        max_queue_size: int = 65536,
        block_timeout: float | None = None,
        isolate_errors: bool = True,
        priority_aging_ms: float = 100.0,
        scheduler: Scheduler | None = None,
        task_priority: int = 0,
    ) -> None:
        self.max_batch_size = _check_size("max_batch_size", max_batch_size)
        self.min_batch_size = _check_size("min_batch_size", min_batch_size)
        if self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be at least "
                f"min_batch_size ({min_batch_size})"
            )
        self.prefetch = _check_size("prefetch", prefetch)
        if (self.prefetch + 1) * self.max_batch_size > _MAX_READ_AHEAD:
            raise ValueError(
                f"(prefetch + 1) * max_batch_size must be at most {_MAX_READ_AHEAD} samples "
                f"(the read-ahead), got ({prefetch} + 1) * {max_batch_size}"
            )
        _check_fraction("memory_fraction", memory_fraction, inclusive=True)
        _check_fraction("knee_tolerance", knee_tolerance, inclusive=False)
        if latency_slo_ms is not None:
            if isinstance(latency_slo_ms, bool) or not isinstance(latency_slo_ms, (int, float)):
                raise TypeError(
                    f"latency_slo_ms must be a number, got {type(latency_slo_ms).__name__}"
                )
            if not 1e-3 <= latency_slo_ms <= 3.6e6:  # 1 us .. an hour, and finite
                raise ValueError(
                    f"latency_slo_ms must be between 0.001 and 3600000, got {latency_slo_ms}"
                )
        if not isinstance(oom_errors, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, BaseException) for kind in oom_errors
        ):
            raise TypeError("oom_errors must be a tuple of exception types")
        if telemetry is not None and not isinstance(telemetry, _core.Telemetry):
            raise TypeError("telemetry must be a dynbatch._core.Telemetry")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning nanoseconds")
        self._pad_value, self._pad_multiple = _check_padding(collate, pad_value, pad_to_multiple_of)
        for name, value in (("bucket_window", bucket_window), ("max_tokens", max_tokens)):
            if value is not None:
                if collate != "pad":
                    raise ValueError(f"{name} needs collate='pad'")
                _check_size(name, value)
        self._bucket_window = bucket_window or 0
        self._max_tokens = max_tokens or 0
        _check_serving_arguments(
            model,
            max_delay_ms,
            max_queue_size,
            block_timeout,
            isolate_errors,
            priority_aging_ms,
            scheduler,
            task_priority,
        )

        self._owns_telemetry = telemetry is None  # a caller's telemetry may be shared
        self._telemetry = telemetry if telemetry is not None else default_telemetry()
        on_gpu = self._telemetry.source.startswith("nvml")
        self._policy = _core.SizingController(
            self.min_batch_size,
            self.max_batch_size,
            latency_slo_ms=None if latency_slo_ms is None else float(latency_slo_ms),
            knee_tolerance=float(knee_tolerance),
            staged_memory_fraction=float(memory_fraction),
            # A GPU's utilization says whether it has compute to spare; a host's does not
            # (other processes, the loader's own threads).
            utilization_target=_GPU_UTILIZATION_TARGET if on_gpu else 0.0,
            # Padding: a batch costs its padded tokens; the controller picks a token budget.
            tokens=collate == "pad",
        )
        self._final_telemetry: dict[str, Any] | None = None
        self._oom_types: tuple[type[BaseException], ...] = (
            torch.cuda.OutOfMemoryError,
            *oom_errors,
        )
        self._clock: Callable[[], int] = clock if clock is not None else time.perf_counter_ns
        self._memory: MemoryMonitor = (
            memory_monitor if memory_monitor is not None else default_memory_monitor()
        )
        self._recorder = _core.StatsRecorder()
        # Enough slots for the batches in flight (prefetched + the caller's + one forming).
        self._pool = _core.StagingPool(self.prefetch + 2)
        self._iterators: weakref.WeakSet[BatchIterator] = weakref.WeakSet()
        self._last_iterator: weakref.ref[BatchIterator] | None = None
        self._split_batches = 0
        self._oom_seen = False  # from then on, batches are checked against the ceilings
        self._oom_times_ns: deque[int] = deque(maxlen=_OOM_EVENTS_KEPT)  # core clock, for plots
        self._last_target = 0
        self._latency_slo_ms = None if latency_slo_ms is None else float(latency_slo_ms)
        self._closed = False
        self.model = model
        self._server: Server | None = None
        if model is not None:
            self._server = Server(
                self,
                model,
                max_delay_ms=float(max_delay_ms),
                max_queue_size=max_queue_size,
                block_timeout=block_timeout,
                isolate_errors=isolate_errors,
                aging_ms=float(priority_aging_ms),
                scheduler=scheduler,
                task_priority=task_priority,
            )

    def __call__(self, data: Iterable[Any], /, *, progress: bool = False) -> BatchIterator:
        """Batches of ``data`` (any iterable of samples), as an iterator.

        ``progress=True`` shows a tqdm bar (samples, samples/s, batch size, memory in use;
        the total from ``len(data)`` when it has one); it needs tqdm."""
        if self._closed:
            raise RuntimeError("this DynamicBatchProcessor is closed")
        try:
            source = iter(data)
        except TypeError:
            raise TypeError(
                "DynamicBatchProcessor expects an iterable of samples (a list, a generator...), "
                f"got {type(data).__name__}"
            ) from None
        bar = ProgressBar(total_of(data), self._telemetry) if progress else None
        iterator = BatchIterator(self, source, bar)
        self._iterators.add(iterator)
        return iterator

    def map(
        self, fn: Callable[[Any], Any], data: Iterable[Any], /, *, progress: bool = False
    ) -> list[Any]:
        """``fn`` on every batch of ``data``; one result per sample, in input order.

        ``fn``'s output (a tensor, or dicts/tuples/lists of tensors) is split along its first
        dimension, which must equal the batch size. A batch whose ``fn`` runs out of memory is
        split in halves and retried, and the size ceiling is lowered; each sample's result
        comes from exactly one successful call. Any other exception propagates.
        ``progress=True`` shows a tqdm bar, as for ``processor(data, progress=True)``.
        """
        if not callable(fn):
            raise TypeError(f"map needs a callable model, got {type(fn).__name__}")
        results: list[Any] = []
        order: list[int] = []  # the samples' input positions, batch after batch
        iterator = self(data, progress=progress)
        with contextlib.closing(iterator):
            for batch in iterator:
                size = iterator.batch_size
                started = self._clock()
                try:
                    output = fn(batch)
                except self._oom_types:
                    iterator.report_oom()
                    continue
                iterator.note_compute(self._clock() - started)
                results.extend(split_outputs(output, size))
                order.extend(iterator.batch_ids)
        if self._bucket_window:  # batches came out of input order
            in_order: list[Any] = [None] * len(results)
            for position, result in zip(order, results, strict=True):
                in_order[position] = result
            return in_order
        return results

    def submit(
        self, sample: Any, /, *, priority: int = 0, timeout: float | None = None
    ) -> Future[Any]:
        """Queues one sample for ``model``; returns its future (thread-safe, never blocks
        unless ``block_timeout`` allows waiting for room in a full queue).

        Larger ``priority`` runs first. A request still waiting ``timeout`` seconds after
        ``submit`` ends with ``RequestTimeout`` and never reaches the model. The future's
        ``cancel()`` works until the request is dispatched. The result is the request's row of
        the model's output; a model error reaches only the request(s) that cause it.
        """
        server = self._server
        if server is None or self._closed:
            server = self._serving()  # raises the reason
        return server.submit(sample, priority, timeout)

    def submit_many(
        self, samples: Iterable[Any], /, *, priority: int = 0, timeout: float | None = None
    ) -> list[Future[Any]]:
        """``submit`` for many samples at once (one call into the core). Every sample is
        checked before any is queued; when the queue fills, the requests that did not fit end
        with ``QueueFull`` (their futures say so) and the others run."""
        return list(self._serving().submit_many(samples, priority, timeout))

    def infer(
        self, sample: Any, /, *, priority: int = 0, timeout: float | None = None
    ) -> Awaitable[Any]:
        """``await processor.infer(sample)``: ``submit`` for asyncio, from a running event
        loop. Returns an awaitable (an ``asyncio.Future``; no task per request); bad input
        raises at the call. Results reach the event loop once per batch; cancelling the
        awaiting task cancels the request."""
        return self._serving().infer(sample, priority, timeout)

    def _serving(self) -> Server:
        if self._server is None:
            raise RuntimeError(
                "submit/infer need a model: DynamicBatchProcessor(..., model=your_model)"
            )
        if self._closed:
            raise ProcessorClosed("this DynamicBatchProcessor is closed")
        return self._server

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit (the types ``report_oom`` expects)."""
        return isinstance(error, self._oom_types)

    def report_oom(self) -> None:
        """The batch the loop is working on ran out of memory: its samples come back in
        smaller batches, and the size ceiling drops. Call it from the loop that caught the
        error, before asking for the next batch."""
        iterator = self._last_iterator() if self._last_iterator is not None else None
        if iterator is None:
            raise RuntimeError("report_oom() needs a batch from a live iteration to report")
        iterator.report_oom()

    def _note_oom(self, size: int, retry_size: int | None) -> None:
        """Records an out-of-memory error (for plots) and logs the recovery."""
        self._oom_times_ns.append(_core.now_ns())
        if retry_size is not None:
            logger.warning(
                "batch of %d ran out of memory: retrying in parts of %d (size ceiling now %d)",
                size,
                retry_size,
                int(self._policy.state()["oom_ceiling"]),
            )

    def _note_target(self, target: int) -> None:
        """Logs a change of the target batch size (once per batch at most, never per sample)."""
        if target == self._last_target:
            return
        previous, self._last_target = self._last_target, target
        if logger.isEnabledFor(logging.DEBUG):
            state = self._policy.state()
            logger.debug(
                "target batch size %d -> %d (limits now: knee %d, memory %d, OOM %d, SLO %d%s)",
                previous,
                target,
                state["knee"],
                state["memory_ceiling"],
                state["oom_ceiling"],
                state["slo_ceiling"],
                ", exploring" if state["exploring"] else "",
            )

    def stats(self) -> Stats:
        """Counters, batch-size histogram, throughput, latency, memory and the learned costs."""
        live_ns = sum(it.active_ns() for it in list(self._iterators))
        server = self._server
        if server is not None:
            live_ns += server.active_ns()
        telemetry = self._final_telemetry or self._telemetry_reading()
        return Stats._from_core(
            self._recorder.snapshot(),
            live_ns,
            self._policy.state(),
            telemetry,
            self._pool.stats(),
            self._split_batches,
            isolated_errors=0 if server is None else server.isolated_errors,
            queued=0 if server is None else server.queued(),
            oom_times_ns=list(self._oom_times_ns),
            latency_slo_ms=self._latency_slo_ms,
        )

    def _telemetry_reading(self) -> dict[str, Any]:
        latest = self._telemetry.latest()
        return {
            "source": self._telemetry.source,
            "peak_rss_bytes": self._telemetry.peak_rss_bytes,
            "min_available_bytes": self._telemetry.min_available_bytes,
            "available_bytes": latest["memory_available_bytes"],
            "total_bytes": latest["memory_total_bytes"],
        }

    def reset_stats(self) -> None:
        """Starts the counters and the memory peaks afresh (the learned costs are kept)."""
        self._recorder.reset()
        if not self._closed:
            self._telemetry.reset_peak()
        self._split_batches = 0
        self._oom_times_ns.clear()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops every live iteration, the serving worker and the telemetry thread.

        Serving: no request is accepted after ``close``. With ``drain`` (the default) every
        queued request is still run (``timeout`` bounds the wait, in seconds); without it, or
        past the timeout, every request not yet dispatched ends with ``ProcessorClosed``.
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close(drain, timeout)
        for iterator in list(self._iterators):
            iterator.close()
        self._final_telemetry = self._telemetry_reading()  # stats() still works after close
        if self._owns_telemetry:
            self._telemetry.close()

    def __enter__(self) -> DynamicBatchProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        model = "" if self.model is None else f", model={self.model!r}"
        return (
            f"DynamicBatchProcessor(max_batch_size={self.max_batch_size}, "
            f"min_batch_size={self.min_batch_size}, prefetch={self.prefetch}{model})"
        )

    def _schema_for(self, first: Any) -> Schema:
        """The checks every later sample must pass, from the first one."""
        return Schema(
            first,
            0,
            pad_value=self._pad_value,
            pad_multiple=self._pad_multiple,
            max_tokens=self._max_tokens,
        )

    def _former_for(self, schema: Schema, capacity: int, **options: Any) -> _core.BatchFormer:
        """A core former for ``schema``'s samples with this processor's sizing and padding;
        ``options`` (serving: max_delay_ms, aging_ms) go to the core as they are."""
        return _core.BatchFormer(
            schema.core_descriptors(),
            capacity,
            self.prefetch,
            self._pool,
            self._policy,
            self._telemetry,
            self._recorder,
            pad_to_multiple_of=self._pad_multiple,
            max_tokens=self._max_tokens,
            bucket_window=self._bucket_window,
            **options,
        )

    def _fitting_size(self, bucket: int, sample_bytes: int) -> int:
        """The largest batch the sizing allows now (the OOM and memory ceilings; below
        min_batch_size if need be)."""
        reading = self._telemetry.latest()
        # Asking for a size with the current reading refreshes the ceilings (changes nothing).
        self._policy.next_batch_size(
            0,
            sample_bytes,
            reading["memory_available_bytes"],
            reading["memory_total_bytes"],
            reading["utilization"],
            bucket,
        )
        state = self._policy.state()
        return max(1, min(int(state["oom_ceiling"]), int(state["memory_ceiling"])))


class BatchIterator(Iterator[Any]):
    """One pass over an input. Closing it (or exhausting it, or dropping it) stops its thread.

    Samples are read ahead by up to ``(prefetch + 1) * max_batch_size``, checked against the
    first sample, and handed to the core, which forms and collates batches on its own thread.
    An invalid sample or an exception from the input is raised after every batch of the
    samples before it has been yielded, so nothing read is lost. After an out-of-memory
    report, batches come back in parts no larger than the lowered ceiling: slices of the
    collated batch, no copy.
    """

    def __init__(
        self,
        processor: DynamicBatchProcessor,
        source: Iterator[Any],
        progress: ProgressBar | None = None,
    ) -> None:
        self._processor = processor
        self._source = source
        self._progress = progress
        # Bucketing chooses among the next bucket_window samples: read at least that far.
        self._read_ahead = max(
            (processor.prefetch + 1) * processor.max_batch_size, processor._bucket_window
        )
        self._schema: Schema | None = None
        self._former: _core.BatchFormer | None = None
        # Per sample, by index, until its batch is formed (bucketing forms out of order).
        self._kept: dict[int, Any] = {}
        self._read = 0
        self._delivered = 0
        self._input_done = False
        self._deferred: BaseException | None = None
        self._parts: deque[_Part] = deque()  # split batches waiting to be yielded
        self._current: _Part | None = None  # yielded, waiting for its feedback
        self._yielded_ns = 0
        self._compute_ns: int | None = None  # measured by map(), else yield-to-resume
        self._started_ns = 0
        self._busy = False  # inside __next__: close() from another thread defers the release
        self._closed = False

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        resumed_ns = self._processor._clock()
        if self._closed:
            raise StopIteration
        self._busy = True
        try:
            self._finish_current(resumed_ns)
            part = None if self._closed else self._next_part()
            if part is None or self._closed:  # the end, or closed from another thread
                deferred = None if self._closed else self._deferred
                self.close()
                if deferred is not None:
                    raise deferred
                raise StopIteration
        except BaseException:
            self.close()
            raise
        finally:
            self._busy = False
            if self._closed:
                self._release()
        assert self._schema is not None
        self._current = part
        self._processor._last_iterator = weakref.ref(self)
        self._processor._memory.begin()
        self._yielded_ns = self._processor._clock()
        return self._schema.structure(part.leaves)

    @property
    def batch_size(self) -> int:
        """Samples in the batch last yielded (0 before the first)."""
        return self._current.size if self._current is not None else 0

    @property
    def batch_ids(self) -> list[int]:
        """Input positions of the samples in the batch last yielded."""
        return self._current.ids if self._current is not None else []

    def note_compute(self, compute_ns: int) -> None:
        """The caller's own measure of its time on the batch last yielded (used by ``map``)."""
        self._compute_ns = compute_ns

    def report_oom(self) -> None:
        """The batch last yielded ran out of memory: it comes back as two halves."""
        part = self._current
        if part is None:
            raise RuntimeError("report_oom() must follow a batch that failed; none is outstanding")
        self._current = None
        self._compute_ns = None
        assert self._former is not None
        processor = self._processor
        processor._policy.on_feedback(
            _core.BatchFeedback(part.size, out_of_memory=True, bucket=self._former.bucket)
        )
        if part.size == 1:
            processor._note_oom(1, None)
            error = DynbatchError(
                f"sample {part.ids[0]} alone does not fit in memory; it cannot be split further"
            )
            self.close()
            raise error
        processor._split_batches += 1
        processor._oom_seen = True
        # Halves, or smaller when the lowered ceilings (the OOM one, or memory that another
        # process took meanwhile) say a half would not fit either.
        chunk = min(-(-part.size // 2), self._fitting_size())
        processor._note_oom(part.size, chunk)
        self._parts.extendleft(reversed(part.split(chunk)))

    def active_ns(self) -> int:
        """Wall time of this pass so far, while it is running."""
        if self._closed or self._started_ns == 0:
            return 0
        return time.perf_counter_ns() - self._started_ns

    def close(self) -> None:
        """Stops the core thread and releases every buffer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._former is not None:
            self._former.close()  # returns once a formation on the iterating thread is done
        if not self._busy:  # else the iterating thread releases when its step ends
            self._release()

    def _release(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._former = None
        self._kept.clear()
        self._parts.clear()
        self._current = None
        self._deferred = None

    def __del__(self) -> None:
        self.close()

    def _finish_current(self, resumed_ns: int) -> None:
        """Feeds the caller's time and memory on the batch last yielded back to the sizing."""
        part = self._current
        if part is None:
            return
        self._current = None
        peak_bytes, reclaimable_bytes = self._processor._memory.end()
        compute_ns = (
            self._compute_ns if self._compute_ns is not None else resumed_ns - self._yielded_ns
        )
        self._compute_ns = None
        assert self._former is not None
        feedback = _core.BatchFeedback(
            part.size,
            compute_ns=compute_ns,
            collate_ns=part.collate_ns,
            peak_memory_bytes=peak_bytes,
            reclaimable_bytes=reclaimable_bytes,
            bucket=self._former.bucket,
        )
        self._former.report_feedback(part.sequence, feedback)
        if self._progress is not None:
            self._progress.done(part.size)

    def _fitting_size(self) -> int:
        """The processor's fitting size for this stream's shape (after an OOM only)."""
        assert self._former is not None
        return self._processor._fitting_size(self._former.bucket, self._former.sample_bytes)

    def _next_part(self) -> _Part | None:
        """The next batch to yield: a waiting part, or the core's next batch; None at the end."""
        part = self._parts.popleft() if self._parts else self._next_core_part()
        if part is None or not self._processor._oom_seen:
            return part
        ceiling = self._fitting_size()
        if part.size <= ceiling:
            return part
        # Formed (or split) before the ceiling dropped: deliver it in parts that fit.
        self._processor._split_batches += 1
        pieces = part.split(ceiling)
        self._parts.extendleft(reversed(pieces[1:]))
        return pieces[0]

    def _next_core_part(self) -> _Part | None:
        """The core's next batch; None at the end of input."""
        if self._former is None and not self._start():
            return None
        assert self._former is not None and self._schema is not None
        self._fill()
        batch = self._former.next_batch()
        if batch is None or self._closed:
            return None
        return self._assemble(batch)

    def _start(self) -> bool:
        """Reads the first sample and starts the core; False for an empty input."""
        self._started_ns = time.perf_counter_ns()
        try:
            first = next(self._source)
        except StopIteration:
            self.close()
            return False
        processor = self._processor
        self._schema = processor._schema_for(first)
        self._former = processor._former_for(self._schema, self._read_ahead)
        addresses: list[int] = []
        lengths: list[int] = []
        self._kept[0] = self._schema.admit(first, 0, addresses, lengths)
        self._read = 1
        self._push(0, addresses, lengths)
        return True

    def _fill(self) -> None:
        """Reads ahead until the core holds enough samples for the batches in flight."""
        assert self._former is not None and self._schema is not None
        room = self._read_ahead - (self._read - self._delivered)
        if self._input_done or room <= 0:
            return
        schema = self._schema
        source = self._source
        kept = self._kept
        admit = schema.admit
        # The lone-tensor check inlined: this loop runs once per sample.
        lone_tensor = schema.fast_path
        dtype, shape = schema.leaves[0].dtype, schema.leaves[0].shape
        strided, tensor_type = torch.strided, torch.Tensor
        index = first_id = self._read
        stop = index + room
        addresses: list[int] = []
        lengths: list[int] | None = [] if schema.padded else None
        try:
            while index < stop:
                sample = next(source)
                if (
                    lone_tensor
                    and type(sample) is tensor_type
                    and sample.dtype is dtype
                    and sample.shape == shape
                    and sample.is_cpu
                    and sample.layout is strided
                    and sample.is_contiguous()
                    and not sample.is_neg()
                ):
                    addresses.append(sample.data_ptr())
                    kept[index] = sample
                else:
                    kept[index] = admit(sample, index, addresses, lengths)
                index += 1
                if index - first_id == _PUSH_CHUNK:
                    self._read = index
                    self._push(first_id, addresses, lengths)
                    first_id, addresses = index, []
                    lengths = [] if lengths is not None else None
        except StopIteration:
            self._input_done = True
        except Exception as error:  # raised to the caller after the batches before it
            self._deferred = error
            self._input_done = True
        self._read = index
        if index > first_id:
            self._push(first_id, addresses, lengths)
        if self._input_done:
            self._former.close_input()

    def _push(self, first_id: int, addresses: list[int], lengths: list[int] | None) -> None:
        """Hands samples first_id .. self._read - 1 (and, padding, their lengths) to the core."""
        assert self._former is not None
        count = self._read - first_id
        accepted = self._former.push(first_id, count, addresses, lengths or [])
        # The read-ahead never exceeds the core's capacity, so a refusal is a bug, not load
        # (or the iterator was closed from another thread, and the step ends anyway).
        if accepted != count and not self._closed:
            raise RuntimeError(
                f"dynbatch core refused samples {first_id + accepted}..{self._read - 1}"
            )

    def _assemble(self, batch: _core.Batch) -> _Part:
        assert self._schema is not None
        size = batch.size
        ids = batch.ids
        in_order = ids[0] == self._delivered and ids[-1] == self._delivered + size - 1
        if not in_order and not self._processor._bucket_window:
            raise RuntimeError(
                f"dynbatch core delivered samples {ids[0]}..{ids[-1]}, "
                f"expected {self._delivered}..{self._delivered + size - 1}"
            )
        self._processor._note_target(batch.target)
        pop = self._kept.pop
        kept = [pop(i) for i in ids]
        self._delivered += size
        leaves = self._schema.batch_leaves(batch, kept)
        return _Part(leaves, ids, batch.sequence, batch.collate_ns)


class _Part:
    """A batch as flat leaves, or a slice of one; ``ids`` are its samples' input positions;
    ``sequence`` is the core's number of the batch (a slice's times add to its batch's)."""

    __slots__ = ("collate_ns", "ids", "leaves", "sequence", "size")

    def __init__(self, leaves: list[Any], ids: list[int], sequence: int, collate_ns: int) -> None:
        self.leaves = leaves
        self.ids = ids
        self.size = len(ids)
        self.sequence = sequence
        self.collate_ns = collate_ns

    def split(self, chunk: int) -> list[_Part]:
        """Consecutive slices of at most ``chunk`` samples (views: nothing is copied)."""
        return [
            _Part(
                [leaf[start : start + chunk] for leaf in self.leaves],
                self.ids[start : start + chunk],
                self.sequence,
                0,
            )
            for start in range(0, self.size, chunk)
        ]
