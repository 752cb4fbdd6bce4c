"""The iterator consumer: ``for batch in processor(data)`` and ``processor.map(fn, data)``."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import _core
from .engine import Engine
from .errors import DynbatchError, InvalidSampleError, UnsupportedLeafError
from .progress import ProgressBar
from .torch_bridge import Schema, split_outputs, stack_small, stacks_small, storage_of
from .transfer import StagedBatch

__all__ = ["BatchIterator", "map_batches"]

# Samples are handed to the core in chunks this size, so collation of the first batch can
# start while the rest of the read-ahead is still being read.
_PUSH_CHUNK = 16
# The feedback argument of BatchFormer.next_plan when there is none (batch size 0).
_NO_FEEDBACK = (0, 0, 0, 0, 0, 0)


def map_batches(iterator: BatchIterator, fn: Callable[[Any], Any]) -> list[Any]:
    """``fn`` on every batch of ``iterator``; one result per sample, in input order. A batch
    whose ``fn`` runs out of memory comes back in parts (``report_oom``)."""
    engine = iterator.engine
    engine.note_model(fn)
    results: list[Any] = []
    order: list[int] = []  # the samples' input positions, batch after batch
    with contextlib.closing(iterator):
        for batch in iterator:
            size = iterator.batch_size
            started = engine.clock()
            try:
                output = fn(batch)
            except engine.oom_types:
                iterator.report_oom()
                continue
            iterator.note_compute(engine.clock() - started)
            results.extend(split_outputs(output, size))
            order.extend(iterator.batch_ids)
    if iterator.groups_by_length:  # batches came out of input order
        in_order: list[Any] = [None] * len(results)
        for position, result in zip(order, results, strict=True):
            in_order[position] = result
        return in_order
    return results


class BatchIterator(Iterator[Any]):
    """One pass over an input. Closing it (or exhausting it, or dropping it) stops its thread.

    Samples are read ahead by up to ``(prefetch + 1) * max_batch_size``, checked against the
    first sample, and handed to the core, which forms and collates batches on its own thread
    (lone CPU tensors of up to 16 KiB are stacked by torch on the caller's thread instead, in
    batches the core sizes). An invalid sample or an exception from the input is raised after
    every batch of the samples before it has been yielded, so nothing read is lost. After an
    out-of-memory report, batches come back in parts no larger than the lowered ceiling:
    slices of the collated batch, no copy.

    A sample's memory is kept alive until it has been copied (its storage, not just the
    tensor), but writing into a sample after handing it over races with the copy, as with
    any asynchronous copy: a source must not refill one buffer and yield it again (a
    ``RuntimeWarning`` names two samples of a generator that share memory); yield a copy.
    ``materialized``: the source is a list or tuple, whose samples may repeat harmlessly.
    One consumer at a time: threads may take turns, but a thread calling ``next`` while
    another is inside it gets a RuntimeError (nothing is lost).
    """

    def __init__(
        self,
        engine: Engine,
        source: Iterator[Any],
        progress: ProgressBar | None = None,
        *,
        materialized: bool = False,
    ) -> None:
        self._engine = engine
        self._source = source
        self._progress = progress
        # Bucketing chooses among the next bucket_window samples: read at least that far.
        options = engine.options
        self._window = options.pass_window()
        self._read_ahead = max((options.prefetch + 1) * options.max_batch_size, self._window)
        self._schema: Schema | None = None
        self._lone = False  # each sample one tensor, batched as one tensor (no structure)
        self._former: _core.BatchFormer | None = None
        # Per sample, by index, until its batch is formed (bucketing forms out of order): the
        # storage the core copies from, so that the caller swapping a tensor's storage
        # (`x.set_()`) cannot free it under the copy.
        self._kept: dict[int, Any] = {}
        # Small lone tensors: samples read ahead, in order, stacked by torch at assembly.
        self._stacking = False
        # Lone tensors already on the (CUDA) device: gathered there, one launch per batch.
        self._gathering = False
        self._queue: list[Any] = []
        self._head = 0  # the queue's first sample not yet in a batch
        self._invalid_seen = False  # a stacked batch held an invalid sample: nothing after it
        # device=: the next core batch, its copy enqueued while the caller computes on this one
        # (an error met fetching it is raised after this one, like any error in the input).
        self._lookahead: _Part | None = None
        self._looked_ahead = False
        # Samples of a list or tuple exist before the pass: one repeated is the same sample
        # (`[x] * n`), not a buffer a generator refills behind the copy.
        self._warned_shared = materialized
        self._read = 0
        self._delivered = 0
        self._input_done = False
        self._deferred: BaseException | None = None
        self._parts: deque[_Part] = deque()  # split batches waiting to be yielded
        self._current: _Part | None = None  # yielded, waiting for its feedback
        # Stacking: the finished batch's feedback, reported with the next core call (one
        # native call per batch rather than one each to report, push and form).
        self._feedback: tuple[int, int, int, int, int, int] | None = None
        self._yielded_ns = 0
        self._compute_ns: int | None = None  # measured by map(), else yield-to-resume
        self._started_ns = 0
        self._busy = False  # inside __next__: close() from another thread defers the release
        self._stepping = threading.Lock()  # held inside __next__: a second thread is refused
        self._closed = False

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        resumed_ns = self._engine.clock()
        if self._closed:
            raise StopIteration
        self._engine.check_process()  # a forked child: the core thread is the parent's
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError(
                "another thread is iterating this BatchIterator at the same time: an "
                "iteration has one consumer at a time (the time from one batch to the next "
                "request is that batch's cost); give each thread its own pass "
                "(processor(data)), or hand batches out from one thread through a queue"
            )
        try:
            return self._step(resumed_ns)
        finally:
            self._stepping.release()

    def _step(self, resumed_ns: int) -> Any:
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
            if self._feedback is not None:  # the step did not reach the core
                self._report_feedback()
            if self._closed:
                self._release()
        engine = self._engine
        if part.staged is not None:
            part.resolve(engine)
        if engine.target is not None and not self._parts and not self._looked_ahead:
            self._look_ahead()
        self._current = part
        engine.memory.begin()
        self._yielded_ns = engine.clock()
        if self._lone:
            return part.leaves[0]
        assert self._schema is not None
        return self._schema.structure(part.leaves)

    @property
    def batch_size(self) -> int:
        """Samples in the batch last yielded (0 before the first)."""
        return self._current.size if self._current is not None else 0

    @property
    def groups_by_length(self) -> bool:
        """Whether batches are grouped by length (and so come out of input order)."""
        return self._window > 1

    @property
    def batch_ids(self) -> list[int]:
        """Input positions of the samples in the batch last yielded."""
        return list(self._current.ids) if self._current is not None else []

    @property
    def engine(self) -> Engine:
        """The engine this pass runs on."""
        return self._engine

    @property
    def outstanding_since_ns(self) -> int | None:
        """When the batch the caller is working on was yielded (engine clock); None when the
        caller holds none."""
        return self._yielded_ns if self._current is not None else None

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
        chunk = self._engine.after_oom(part.size, self._former.bucket, self._former.sample_bytes)
        if chunk is None:
            error = DynbatchError(
                f"sample {part.ids[0]} alone does not fit in memory; it cannot be split further"
            )
            self.close()
            raise error
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
        if self._schema is not None:
            self._engine.pass_ended()
        if not self._busy:  # else the iterating thread releases when its step ends
            self._release()

    def _release(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._former = None
        self._kept.clear()
        self._queue.clear()
        self._lookahead = None
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
        peak_bytes, reclaimable_bytes = self._engine.memory.end()
        compute_ns = (
            self._compute_ns if self._compute_ns is not None else resumed_ns - self._yielded_ns
        )
        self._compute_ns = None
        self._feedback = (
            part.sequence,
            part.size,
            compute_ns,
            part.collate_ns,
            peak_bytes,
            reclaimable_bytes,
        )
        if not self._stacking:
            self._report_feedback()
        if self._progress is not None:
            self._progress.done(part.size)

    def _report_feedback(self) -> None:
        """Reports the pending feedback on its own (stacking reports it with the next batch)."""
        assert self._former is not None and self._feedback is not None
        sequence, size, compute_ns, collate_ns, peak_bytes, reclaimable_bytes = self._feedback
        self._feedback = None
        # Positional: pybind11 parses keywords at ~0.5 us a call, once per batch here.
        feedback = _core.BatchFeedback(size, compute_ns, collate_ns, peak_bytes, reclaimable_bytes)
        self._former.report_feedback(sequence, feedback)  # fills in the bucket

    def _fitting_size(self) -> int:
        """The engine's fitting size for this stream's shape (after an OOM only)."""
        assert self._former is not None
        return self._engine.fitting_size(self._former.bucket, self._former.sample_bytes)

    def _next_part(self) -> _Part | None:
        """The next batch to yield: a waiting part, or the core's next batch (already fetched
        when the last one was yielded, with a device); None at the end."""
        if self._parts:
            part: _Part | None = self._parts.popleft()
        elif self._looked_ahead:
            self._looked_ahead = False
            part, self._lookahead = self._lookahead, None
        else:
            part = self._fetch_core_part()
        if part is None or not self._engine.oom_seen:
            return part
        ceiling = self._fitting_size()
        if part.size <= ceiling:
            return part
        # Formed (or split) before the ceiling dropped: deliver it in parts that fit.
        self._engine.note_split()
        part.resolve(self._engine)
        pieces = part.split(ceiling)
        self._parts.extendleft(reversed(pieces[1:]))
        return pieces[0]

    def _look_ahead(self) -> None:
        """Fetches and stages the next core batch now, so its copy overlaps the caller's work
        on the batch about to be yielded."""
        self._looked_ahead = True
        try:
            self._lookahead = self._fetch_core_part()
        except Exception as error:  # raised after the batch being yielded, not instead of it
            self._lookahead = None
            self._deferred = error
            self._invalid_seen = True

    def _fetch_core_part(self) -> _Part | None:
        """The core's next batch, its copy to the device (if any) enqueued; None at the end."""
        if self._former is None and not self._start():
            return None
        assert self._former is not None and self._schema is not None
        if self._invalid_seen:
            return None
        if self._stacking:
            return self._fetch_stacked()
        self._fill()
        batch = self._former.next_batch()
        if batch is None or self._closed:
            return None
        return self._assemble(batch)

    def _fetch_stacked(self) -> _Part | None:
        """Stacking: the samples read ahead, the last batch's feedback and the request for
        the next batch go to the core in one call. Torch stacks the batch, checking the
        samples' shapes and devices in one call; only the dtype (which torch would cast
        silently) and shared objects are checked per sample. Anything unusual takes the
        checked path. None at the end, or when the batch's first sample was invalid (the
        error is raised next)."""
        assert self._former is not None and self._schema is not None
        first_id = self._read
        closing = self._fill_queue()
        count = self._read - first_id
        feedback = self._feedback or _NO_FEEDBACK
        self._feedback = None
        accepted, plan = self._former.next_plan(*feedback, first_id, count, closing)
        if accepted != count and not self._closed:  # as in _push
            raise RuntimeError(
                f"dynbatch core refused samples {first_id + accepted}..{self._read - 1}"
            )
        if plan is None or self._closed:
            return None
        first_id, size, sequence, target = plan
        if first_id != self._delivered:
            raise RuntimeError(
                f"dynbatch core delivered samples {first_id}..{first_id + size - 1}, "
                f"expected {self._delivered}..{self._delivered + size - 1}"
            )
        self._engine.note_target(target)
        queue, head = self._queue, self._head
        end = head + size
        samples = queue[head:end]
        if end > len(queue) // 2:
            del queue[:end]
            end = 0
        self._head = end
        self._delivered += size
        started = time.perf_counter_ns()
        if self._gathering:
            return self._gathered(first_id, sequence, samples, started)
        spec = self._schema.leaves[0]
        # A list's samples may repeat harmlessly (`[x] * n`); a generator's may be refills.
        repeated = not self._warned_shared and len(set(map(id, samples))) != size
        stacked = None if repeated else stack_small(samples, spec.dtype, spec.shape)
        if stacked is None:
            return self._assemble_checked(first_id, sequence, samples)
        return _Part(
            [stacked], range(first_id, first_id + size), sequence, time.perf_counter_ns() - started
        )

    def _start(self) -> bool:
        """Reads the first sample and starts the core; False for an empty input."""
        self._started_ns = time.perf_counter_ns()
        try:
            first = next(self._source)
        except StopIteration:
            self.close()
            return False
        target = self._engine.target
        self._gathering = (
            target is not None
            and target.device.type == "cuda"
            and isinstance(first, torch.Tensor)
            and first.device == target.device
        )
        if self._gathering and not self._engine.options.bucket_window:
            self._window = 0  # gathered on the device in input order: no default grouping
        # The checks come from the first sample's shape and dtype, which a host proxy shares.
        self._schema = self._engine.schema_for(
            torch.empty(first.shape, dtype=first.dtype) if self._gathering else first
        )
        if self._gathering and not (
            self._schema.single_tensor
            and not self.groups_by_length
            and not self._engine.options.max_tokens
        ):
            raise UnsupportedLeafError(
                0,
                "",
                f"samples already on {first.device} are batched there when each is one tensor, "
                "without bucket_window or max_tokens; move them to the host, or give lone tensors",
            )
        self._lone = self._schema.single_tensor and not self._schema.padded
        # With a device, host batches go through the pinned staging slots the core fills.
        self._stacking = self._gathering or (
            target is None and self._schema.fast_path and stacks_small(first)
        )
        # Stacking leaves the core no copy to overlap: it forms batches on this thread.
        self._former = self._engine.former_for(
            self._schema,
            self._read_ahead,
            bucket_window=self._window,
            collate=not self._stacking,
            own_thread=not self._stacking,
        )
        addresses: list[int] = []
        lengths: list[int] = []
        if self._stacking:
            self._queue.append(first)
        else:
            self._kept[0] = storage_of(self._schema.admit(first, 0, addresses, lengths))
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
                    kept[index] = sample.untyped_storage()
                else:
                    kept[index] = storage_of(admit(sample, index, addresses, lengths))
                index += 1
                if index - first_id == _PUSH_CHUNK:
                    self._read = index
                    self._warn_if_shared(first_id, addresses)
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
            self._warn_if_shared(first_id, addresses)
            self._push(first_id, addresses, lengths)
        if self._input_done:
            self._former.close_input()

    def _fill_queue(self) -> bool:
        """Stacking: reads ahead into the queue, unchecked (torch checks the samples as it
        stacks; the core is told only their count). True when the input ended just now."""
        room = self._read_ahead - (self._read - self._delivered)
        if self._input_done or room <= 0:
            return False
        queue = self._queue
        before = len(queue)
        try:
            queue.extend(itertools.islice(self._source, room))  # keeps what came before a raise
            if len(queue) - before < room:
                self._input_done = True
        except Exception as error:  # raised to the caller after the batches before it
            self._deferred = error
            self._input_done = True
        self._read += len(queue) - before
        return self._input_done

    def _warn_if_shared(self, first_id: int, addresses: list[int]) -> None:
        """One warning per pass when samples handed over together share memory: a source
        that refills one buffer and yields it again, so every row would hold its last fill."""
        if self._warned_shared or len(set(addresses)) == len(addresses):
            return
        assert self._schema is not None
        leaves = max(1, len(addresses) // max(1, self._read - first_id))
        seen: dict[int, int] = {}
        for position, address in enumerate(addresses):
            sample = first_id + position // leaves
            other = seen.setdefault(address, sample)
            if other != sample:
                self._warned_shared = True
                warnings.warn(
                    f"samples {other} and {sample} share memory: the batch is copied after "
                    "both were read, so both rows hold what the memory holds then (a source "
                    "that refills one buffer must yield a copy, e.g. buffer.clone())",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return

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
        if not in_order and not self.groups_by_length:
            raise RuntimeError(
                f"dynbatch core delivered samples {ids[0]}..{ids[-1]}, "
                f"expected {self._delivered}..{self._delivered + size - 1}"
            )
        self._engine.note_target(batch.target)
        pop = self._kept.pop
        kept = [pop(i) for i in ids]
        self._delivered += size
        leaves = self._schema.batch_leaves(batch, kept)
        return _Part(
            leaves, ids, batch.sequence, batch.collate_ns, self._engine.stage(leaves, batch)
        )

    def _gathered(
        self, first_id: int, sequence: int, samples: list[Any], started: int
    ) -> _Part | None:
        """Samples already on the device, gathered there by one launch (padding: gather-pad).
        An invalid sample ends the pass after the samples before it, named by its index."""
        assert self._schema is not None and self._engine.target is not None
        target, schema = self._engine.target, self._schema
        spec = schema.leaves[0]
        for offset, sample in enumerate(samples):
            problem = _device_sample_problem(sample, target.device, spec.dtype, spec.shape)
            if problem is not None:
                self._deferred = InvalidSampleError(first_id + offset, "", problem)
                self._invalid_seen = True
                samples = samples[:offset]
                break
        if not samples:
            return None
        ids = range(first_id, first_id + len(samples))
        if schema.padded:
            options = self._engine.options
            data, lengths = target.gather_pad(
                samples, float(options.pad_value or 0), options.pad_multiple
            )
            ids_tensor = torch.tensor(ids, dtype=torch.int64)
            leaves = [data, lengths.to(target.device), ids_tensor.to(target.device)]
        else:
            leaves = [target.gather(samples)]
        return _Part(leaves, ids, sequence, time.perf_counter_ns() - started)

    def _assemble_checked(self, first_id: int, sequence: int, samples: list[Any]) -> _Part | None:
        """A stacked batch that torch could not stack as it is: each sample checked as the
        core path checks it (an invalid one ends the pass after the samples before it),
        then collated by the core."""
        assert self._schema is not None and self._former is not None
        addresses: list[int] = []
        kept: list[Any] = []
        for offset, sample in enumerate(samples):
            try:
                kept.append(self._schema.admit(sample, first_id + offset, addresses))
            except InvalidSampleError as error:
                self._deferred = error
                self._invalid_seen = True
                break
        if not kept:
            return None
        self._warn_if_shared(first_id, addresses)
        started = time.perf_counter_ns()
        collated = _core.collate(
            self._schema.core_descriptors(), addresses, len(kept), self._engine.pool
        )
        leaves = self._schema.batch_leaves(collated, kept)
        return _Part(
            leaves,
            range(first_id, first_id + len(kept)),
            sequence,
            time.perf_counter_ns() - started,
            self._engine.stage(leaves, collated),
        )


def _device_sample_problem(
    sample: Any, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]
) -> str | None:
    """Why a sample cannot join a gather on ``device`` (None: it can); ``shape``'s first
    dimension is -1 when padding."""
    if not isinstance(sample, torch.Tensor):
        return f"a {type(sample).__name__} in a stream of tensors on {device}"
    if sample.device != device:
        return f"a tensor on {sample.device} in a stream on {device}"
    if sample.dtype != dtype:
        return f"dtype {sample.dtype} differs from {dtype} of sample 0"
    own = tuple(sample.shape)
    if shape and shape[0] == -1:
        if len(own) != len(shape) or own[1:] != shape[1:]:
            return f"shape {own} differs from {shape}: only the first dimension may differ"
    elif own != shape:
        return f"shape {own} differs from {shape} of sample 0"
    return None


class _Part:
    """A batch as flat leaves, or a slice of one; ``ids`` are its samples' input positions;
    ``sequence`` is the core's number of the batch (a slice's times add to its batch's);
    ``staged``: its copy to the device, in flight until ``resolve``."""

    __slots__ = ("collate_ns", "ids", "leaves", "sequence", "size", "staged")

    def __init__(
        self,
        leaves: list[Any],
        ids: Sequence[int],
        sequence: int,
        collate_ns: int,
        staged: StagedBatch | None = None,
    ) -> None:
        self.leaves = leaves
        self.ids = ids
        self.size = len(ids)
        self.sequence = sequence
        self.collate_ns = collate_ns
        self.staged = staged

    def resolve(self, engine: Engine) -> None:
        """The leaves on the device once its copy is ordered before the caller's work."""
        if self.staged is not None:
            self.leaves = engine.on_device(self.staged)
            self.staged = None

    def split(self, chunk: int) -> list[_Part]:
        """Consecutive slices of at most ``chunk`` samples (views: nothing is copied); the
        part must be resolved."""
        assert self.staged is None
        return [
            _Part(
                [leaf[start : start + chunk] for leaf in self.leaves],
                self.ids[start : start + chunk],
                self.sequence,
                0,
            )
            for start in range(0, self.size, chunk)
        ]
