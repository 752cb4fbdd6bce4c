"""DynamicBatchProcessor: batches whose size follows the caller's speed and the memory headroom."""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from . import _core
from .stats import Stats
from .torch_bridge import Schema

__all__ = ["BatchIterator", "DynamicBatchProcessor"]

# Samples are handed to the core in chunks this size, so collation of the first batch can
# start while the rest of the read-ahead is still being read.
_PUSH_CHUNK = 16


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


class DynamicBatchProcessor:
    """Forms batches from an iterable of samples, sizing each batch as it goes.

    ``for batch in processor(samples)`` yields batches in input order; every sample lands in
    exactly one batch, and each batch holds between ``min_batch_size`` and ``max_batch_size``
    samples except possibly the last. The size climbs toward the best measured throughput of
    the loop (the caller's time per batch against its size) and is capped by host memory
    headroom. The next batch is collated by the core while the caller works on the current one.

    Args:
        max_batch_size: the largest batch (default 256).
        min_batch_size: the smallest batch, except a last one (default 1).
        prefetch: batches prepared ahead of the caller (default 1).
        memory_fraction: share of available host memory one staged batch may take.
        telemetry: a ``dynbatch._core.Telemetry`` to read memory from (default: the host's,
            sampled every 50 ms by a core thread). Tests pass a scripted one.
    """

    def __init__(
        self,
        max_batch_size: int = 256,
        min_batch_size: int = 1,
        *,
        prefetch: int = 1,
        memory_fraction: float = 0.25,
        telemetry: _core.Telemetry | None = None,
    ) -> None:
        self.max_batch_size = _check_size("max_batch_size", max_batch_size)
        self.min_batch_size = _check_size("min_batch_size", min_batch_size)
        if self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be at least "
                f"min_batch_size ({min_batch_size})"
            )
        self.prefetch = _check_size("prefetch", prefetch)
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)):
            raise TypeError(
                f"memory_fraction must be a number, got {type(memory_fraction).__name__}"
            )
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if telemetry is not None and not isinstance(telemetry, _core.Telemetry):
            raise TypeError("telemetry must be a dynbatch._core.Telemetry")

        self._telemetry = telemetry if telemetry is not None else _core.Telemetry.host(0.05)
        self._policy = _core.ThroughputClimb(
            self.min_batch_size, self.max_batch_size, float(memory_fraction)
        )
        self._recorder = _core.StatsRecorder()
        # Enough slots for the batches in flight (prefetched + the caller's + one forming).
        self._pool = _core.StagingPool(self.prefetch + 2)
        self._iterators: weakref.WeakSet[BatchIterator] = weakref.WeakSet()
        self._closed = False

    def __call__(self, data: Iterable[Any], /) -> BatchIterator:
        """Batches of ``data`` (any iterable of samples), as an iterator."""
        if self._closed:
            raise RuntimeError("this DynamicBatchProcessor is closed")
        try:
            source = iter(data)
        except TypeError:
            raise TypeError(
                "DynamicBatchProcessor expects an iterable of samples (a list, a generator...), "
                f"got {type(data).__name__}"
            ) from None
        iterator = BatchIterator(self, source)
        self._iterators.add(iterator)
        return iterator

    def stats(self) -> Stats:
        """Counters, batch-size histogram, throughput, latency and memory so far."""
        live_ns = sum(it.active_ns() for it in list(self._iterators))
        telemetry = {
            "source": self._telemetry.source,
            "peak_rss_bytes": self._telemetry.peak_rss_bytes,
            "min_available_bytes": self._telemetry.min_available_bytes,
        }
        return Stats.from_core(
            self._recorder.snapshot(),
            live_ns,
            self._policy.state(),
            telemetry,
            self._pool.stats(),
        )

    def reset_stats(self) -> None:
        """Starts the counters and the memory peaks afresh (the learned sizing is kept)."""
        self._recorder.reset()
        self._telemetry.reset_peak()

    def close(self) -> None:
        """Stops every live iteration and the telemetry thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for iterator in list(self._iterators):
            iterator.close()
        self._telemetry.close()

    def __enter__(self) -> DynamicBatchProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DynamicBatchProcessor(max_batch_size={self.max_batch_size}, "
            f"min_batch_size={self.min_batch_size}, prefetch={self.prefetch})"
        )


class BatchIterator(Iterator[Any]):
    """One pass over an input. Closing it (or exhausting it, or dropping it) stops its thread.

    Samples are read ahead by up to ``(prefetch + 1) * max_batch_size``, checked against the
    first sample, and handed to the core, which forms and collates batches on its own thread.
    An invalid sample or an exception from the input is raised after every batch of the
    samples before it has been yielded, so nothing read is lost.
    """

    def __init__(self, processor: DynamicBatchProcessor, source: Iterator[Any]) -> None:
        self._processor = processor
        self._source = source
        self._read_ahead = (processor.prefetch + 1) * processor.max_batch_size
        self._schema: Schema | None = None
        self._former: _core.BatchFormer | None = None
        self._kept: deque[Any] = deque()  # per sample, in order, until its batch is formed
        self._read = 0
        self._delivered = 0
        self._input_done = False
        self._deferred: BaseException | None = None
        self._pending_feedback: tuple[int, int, int, int] | None = None
        self._started_ns = 0
        self._closed = False

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        resumed_ns = time.perf_counter_ns()
        if self._closed:
            raise StopIteration
        try:
            self._report_feedback(resumed_ns)
            if self._former is None and not self._start():
                raise StopIteration
            assert self._former is not None
            self._fill()
            batch = self._former.next_batch()
            if batch is None:
                deferred = self._deferred
                self.close()
                if deferred is not None:
                    raise deferred
                raise StopIteration
            result = self._assemble(batch)
        except BaseException:
            self.close()
            raise
        self._pending_feedback = (
            batch.sequence,
            batch.size,
            batch.collate_ns,
            time.perf_counter_ns(),
        )
        return result

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
            self._former.close()
            self._former = None
        self._kept.clear()
        self._deferred = None

    def __del__(self) -> None:
        self.close()

    def _report_feedback(self, resumed_ns: int) -> None:
        if self._pending_feedback is None:
            return
        sequence, size, collate_ns, yielded_ns = self._pending_feedback
        self._pending_feedback = None
        assert self._former is not None
        self._former.report_feedback(sequence, size, resumed_ns - yielded_ns, collate_ns)

    def _start(self) -> bool:
        """Reads the first sample and starts the core; False for an empty input."""
        self._started_ns = time.perf_counter_ns()
        try:
            first = next(self._source)
        except StopIteration:
            self.close()
            return False
        self._schema = Schema(first, 0)
        processor = self._processor
        self._former = _core.BatchFormer(
            self._schema.core_descriptors(),
            self._read_ahead,
            processor.prefetch,
            processor._pool,
            processor._policy,
            processor._telemetry,
            processor._recorder,
        )
        addresses: list[int] = []
        self._kept.append(self._schema.admit(first, 0, addresses))
        self._read = 1
        self._push(0, addresses)
        return True

    def _fill(self) -> None:
        """Reads ahead until the core holds enough samples for the batches in flight."""
        assert self._former is not None and self._schema is not None
        room = self._read_ahead - (self._read - self._delivered)
        if self._input_done or room <= 0:
            return
        schema = self._schema
        source = self._source
        keep = self._kept.append
        admit = schema.admit
        # The lone-tensor check inlined: this loop runs once per sample.
        lone_tensor = schema.single_tensor
        dtype, shape = schema.leaves[0].dtype, schema.leaves[0].shape
        strided, tensor_type = torch.strided, torch.Tensor
        index = first_id = self._read
        stop = index + room
        addresses: list[int] = []
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
                ):
                    addresses.append(sample.data_ptr())
                    keep(sample)
                else:
                    keep(admit(sample, index, addresses))
                index += 1
                if index - first_id == _PUSH_CHUNK:
                    self._read = index
                    self._push(first_id, addresses)
                    first_id, addresses = index, []
        except StopIteration:
            self._input_done = True
        except Exception as error:  # raised to the caller after the batches before it
            self._deferred = error
            self._input_done = True
        self._read = index
        if index > first_id:
            self._push(first_id, addresses)
        if self._input_done:
            self._former.close_input()

    def _push(self, first_id: int, addresses: list[int]) -> None:
        """Hands samples first_id .. self._read - 1 to the core."""
        assert self._former is not None
        count = self._read - first_id
        accepted = self._former.push(first_id, count, addresses)
        # The read-ahead never exceeds the core's capacity, so a refusal is a bug, not load.
        if accepted != count:
            raise RuntimeError(
                f"dynbatch core refused samples {first_id + accepted}..{self._read - 1}"
            )

    def _assemble(self, batch: _core.Batch) -> Any:
        assert self._schema is not None
        size = batch.size
        ids = batch.ids
        if ids[0] != self._delivered or ids[-1] != self._delivered + size - 1:
            raise RuntimeError(
                f"dynbatch core delivered samples {ids[0]}..{ids[-1]}, "
                f"expected {self._delivered}..{self._delivered + size - 1}"
            )
        kept = [self._kept.popleft() for _ in range(size)]
        self._delivered += size
        return self._schema.build_batch(batch, kept)
