"""The trainer's consumer: micro-batches that add up to optimizer steps.

``processor.steps(data, samples_per_step=N)`` yields ``MicroBatch`` objects. Each optimizer
step holds exactly N samples (the last of an epoch may be short, or dropped), cut into
micro-batches whose size the engine chooses as it does for inference (memory headroom,
measured throughput). A micro-batch never holds samples of two steps: the core former is
given one step's samples at a time (one formation pass per step), so every batch it forms
lies inside the step. ``weight`` is the micro-batch's share of the step, so
``loss.mean() * weight`` summed over the step's micro-batches is the step's mean loss, and
its gradient the gradient of one batch of N.

The step's samples are kept until the step is done: after an out-of-memory error,
``report_oom()`` makes the whole step come again in smaller micro-batches (the caller zeroes
its gradients), and the lowered ceiling holds for the rest of the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _core
from .engine import Engine
from .errors import DynbatchError
from .progress import ProgressBar
from .torch_bridge import Schema

__all__ = [
    "MicroBatch",
    "StepIterator",
    "StepPlan",
    "TrainingState",
    "epoch_order",
    "paired",
]


@dataclass
class MicroBatch:
    """One micro-batch of an optimizer step.

    Attributes:
        data: the batch, in the samples' structure (as ``processor(data)`` yields it).
        size: samples in this micro-batch (on this rank).
        weight: its share of the step: ``size / step_samples`` (times the world size under
            torch.distributed, whose gradient averaging divides by it again). Scale the
            micro-batch's mean loss by it before ``backward``.
        step: the optimizer step's index (counted over the whole run, from 0).
        epoch: the epoch the step belongs to (from 0).
        first: the step's first micro-batch (zero the gradients before it).
        last: the step's last micro-batch (call ``optimizer.step()`` after it).
        step_samples: samples in the whole step (over all ranks).
        indices: the samples' positions in ``data``.
    """

    data: Any
    size: int
    weight: float
    step: int
    epoch: int
    first: bool
    last: bool
    step_samples: int
    indices: list[int]


@dataclass(frozen=True)
class StepPlan:
    """The next step's size (samples over all ranks) and, when the trainer measures the
    gradient noise, the most samples its first micro-batch may hold (None: no limit)."""

    samples: int
    first_micro_limit: int | None = None


@dataclass
class TrainingState:
    """Where training stands, kept by the processor across ``fit``/``steps`` calls and saved
    by ``state_dict()``: the sampler position, the steps taken and the adaptive state."""

    epoch: int = 0
    position: int = 0  # samples of the epoch's order used by completed steps (all ranks)
    step: int = 0
    seed: int | None = None  # the shuffling seed (drawn once when shuffle=True gives none)
    length: int | None = None  # samples in the data the position refers to
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    warned_nonfinite: bool = False
    adaptive: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "seed": self.seed,
            "length": self.length,
            "skipped_steps": self.skipped_steps,
            "adaptive": dict(self.adaptive),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "position", "step", "seed", "length"} - set(state)
        if missing:
            raise ValueError(f"training state lacks {sorted(missing)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.step = int(state["step"])
        self.seed = None if state["seed"] is None else int(state["seed"])
        self.length = None if state["length"] is None else int(state["length"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.adaptive = dict(state.get("adaptive", {}))


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``length`` samples in ``epoch`` (the same on every rank and
    after a restart: a function of the seed and the epoch only)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order: list[int] = torch.randperm(length, generator=generator).tolist()
    return order


class _Paired(Sequence[tuple[Any, Any]]):
    def __init__(self, inputs: Any, targets: Any) -> None:
        self._inputs = inputs
        self._targets = targets

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._inputs[index], self._targets[index]


def paired(inputs: Any, targets: Any) -> Sequence[tuple[Any, Any]]:
    """``(inputs[i], targets[i])`` samples for ``fit`` and ``steps``, checked to be as many
    (``zip`` would silently drop the extra ones)."""
    counts = []
    for name, values in (("inputs", inputs), ("targets", targets)):
        try:
            counts.append(len(values))
            values[0:0]
        except TypeError:
            raise TypeError(
                f"paired() needs {name} with a length and indexing (a tensor, array or list), "
                f"got {type(values).__name__}"
            ) from None
    if counts[0] != counts[1]:
        raise ValueError(
            f"paired(): inputs has {counts[0]} samples but targets has {counts[1]}; "
            "each input needs exactly one target"
        )
    return _Paired(inputs, targets)


def length_of(data: Any) -> int | None:
    """Samples in ``data`` when it can be indexed by position (len and [i]), else None."""
    if isinstance(data, (str, bytes)) or not hasattr(data, "__getitem__"):
        return None
    try:
        return len(data)
    except TypeError:
        return None


class _Micro:
    """A formed micro-batch (flat leaves) or a slice of one; ``ids`` are data positions."""

    __slots__ = ("collate_ns", "ids", "leaves", "sequence", "size")

    def __init__(self, leaves: list[Any], ids: list[int], sequence: int, collate_ns: int) -> None:
        self.leaves = leaves
        self.ids = ids
        self.size = len(ids)
        self.sequence = sequence
        self.collate_ns = collate_ns

    def split(self, chunk: int) -> list[_Micro]:
        """Consecutive slices of at most ``chunk`` samples (views: nothing is copied)."""
        return [
            _Micro(
                [leaf[start : start + chunk] for leaf in self.leaves],
                self.ids[start : start + chunk],
                self.sequence,
                self.collate_ns if start == 0 else 0,
            )
            for start in range(0, self.size, chunk)
        ]


class StepIterator(Iterator[MicroBatch]):
    """Micro-batches of optimizer steps over ``data`` (see the module's docstring).

    ``plan`` gives each step's size when the step starts. ``epochs`` counts the epoch ends
    this pass crosses (a pass that starts mid-epoch first finishes that epoch); ``max_steps``
    stops it earlier. ``state`` is updated as steps complete: a step counts as done once its
    last micro-batch has been yielded (``report_oom`` on that micro-batch takes it back).
    """

    def __init__(
        self,
        engine: Engine,
        data: Iterable[Any],
        state: TrainingState,
        plan: Callable[[], StepPlan],
        *,
        capacity: int,
        epochs: int,
        max_steps: int | None,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        progress: ProgressBar | None = None,
    ) -> None:
        self._closed = True  # until built: __del__ of a refused pass has nothing to close
        self._engine = engine
        self._data = data
        self._length = length_of(data)
        self._state = state
        self._plan = plan
        self._capacity = capacity
        self._epochs_left = epochs
        self._max_steps = max_steps
        self._steps_taken = 0
        self._shuffle = shuffle
        self._drop_last = drop_last
        self._rank = rank
        self._world = world_size
        self._progress = progress
        if shuffle and self._length is None:
            raise TypeError(
                "shuffle=True needs data with a length and indexing by position (a list, a "
                f"tensor, a map-style Dataset), got {type(data).__name__}"
            )
        if self._length is not None:
            if state.length is not None and state.position > 0 and state.length != self._length:
                raise ValueError(
                    f"the processor's training position ({state.position} samples into epoch "
                    f"{state.epoch}) is for data of {state.length} samples, but this data has "
                    f"{self._length}"
                )
            state.length = self._length
        if shuffle and state.seed is None:
            state.seed = int(torch.randint(0, 2**62, (1,)).item())
        self._order: list[int] | None = None  # this epoch's order (shuffled)
        self._source: Iterator[Any] | None = None  # this epoch's samples (unindexed data)
        self._schema: Schema | None = None
        self._former: _core.BatchFormer | None = None
        # The current step: its samples by data position (kept until the step is done), the
        # positions not yet delivered by the former, and the micro-batches waiting to go out.
        self._step_kept: dict[int, Any] = {}
        self._step_ids: list[int] = []
        self._step_addresses: list[int] = []  # leaf addresses, sample-major (for a redo)
        self._step_lengths: list[int] = []
        self._undelivered: set[int] = set()
        self._parts: list[_Micro] = []
        self._step_samples = 0  # over all ranks
        self._step_global = 0  # the step's size over all ranks, for the weights
        self._step_index = 0
        self._step_epoch = 0
        self._step_position = 0  # where the step starts in the epoch's order
        self._step_first_limit: int | None = None
        self._limit: int | None = None  # micro-batch ceiling for this step after an OOM
        self._yielded_in_step = 0
        self._first_pending = True
        self._current: _Micro | None = None
        self._current_last = False
        self._yielded_ns = 0
        self._compute_ns: int | None = None
        self._started_ns = 0
        self._closed = False

    # ----------------------------------------------------------------------- public

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> MicroBatch:
        resumed_ns = self._engine.clock()
        if self._closed:
            raise StopIteration
        try:
            self._finish_current(resumed_ns)
            micro = self._next_micro()
        except BaseException:
            self.close()
            raise
        if micro is None:
            self.close()
            raise StopIteration
        assert self._schema is not None
        self._current = micro
        self._yielded_in_step += micro.size
        last = self._yielded_in_step == len(self._step_ids)
        self._current_last = last
        first = self._first_pending
        self._first_pending = False
        if last:  # the step counts as done unless report_oom() takes it back
            self._state.position = self._step_position + self._step_global
            self._state.step = self._step_index + 1
            self._steps_taken += 1
        batch = MicroBatch(
            data=self._schema.structure(micro.leaves),
            size=micro.size,
            weight=micro.size * self._world / self._step_global,
            step=self._step_index,
            epoch=self._step_epoch,
            first=first,
            last=last,
            step_samples=self._step_global,
            indices=micro.ids,
        )
        self._engine.memory.begin()
        self._yielded_ns = self._engine.clock()
        return batch

    @property
    def engine(self) -> Engine:
        """The engine this pass runs on."""
        return self._engine

    @property
    def outstanding_since_ns(self) -> int | None:
        """When the micro-batch the caller works on was yielded; None when it holds none."""
        return self._yielded_ns if self._current is not None else None

    def note_compute(self, compute_ns: int) -> None:
        """The caller's own measure of its time on the micro-batch last yielded (``fit``
        measures forward and backward only)."""
        self._compute_ns = compute_ns

    def report_oom(self) -> None:
        """The micro-batch last yielded ran out of memory: the whole step comes again, in
        micro-batches no larger than half of it (or what the lowered ceilings allow). Zero the
        gradients before asking for the next micro-batch: the step's earlier micro-batches
        are run again too."""
        micro = self._current
        if micro is None:
            raise RuntimeError(
                "report_oom() must follow a micro-batch that failed; none is outstanding"
            )
        self._current = None
        self._compute_ns = None
        self._engine.memory.end()
        assert self._former is not None
        chunk = self._engine.after_oom(micro.size, self._former.bucket, self._former.sample_bytes)
        if chunk is None:
            error = DynbatchError(
                f"sample {micro.ids[0]} alone does not fit in memory; it cannot be split further"
            )
            self.close()
            raise error
        self._limit = chunk if self._limit is None else min(self._limit, chunk)
        if self._current_last:  # take back the step's completion
            self._state.position = self._step_position
            self._state.step = self._step_index
            self._steps_taken -= 1
        self._restart_step()

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
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._step_kept.clear()
        self._parts.clear()
        self._current = None

    def __del__(self) -> None:
        self.close()

    # ---------------------------------------------------------------------- internals

    def _finish_current(self, resumed_ns: int) -> None:
        """Feeds the caller's time and memory on the micro-batch last yielded to the sizing."""
        micro = self._current
        if micro is None:
            return
        self._current = None
        peak_bytes, reclaimable_bytes = self._engine.memory.end()
        compute_ns = (
            self._compute_ns if self._compute_ns is not None else resumed_ns - self._yielded_ns
        )
        self._compute_ns = None
        assert self._former is not None
        self._former.report_feedback(
            micro.sequence,
            _core.BatchFeedback(
                micro.size,
                compute_ns=compute_ns,
                collate_ns=micro.collate_ns,
                peak_memory_bytes=peak_bytes,
                reclaimable_bytes=reclaimable_bytes,
                bucket=self._former.bucket,
            ),
        )
        if self._progress is not None:
            self._progress.done(micro.size)

    def _next_micro(self) -> _Micro | None:
        """The next micro-batch to yield; None when the pass is over."""
        if self._yielded_in_step == len(self._step_ids) and not self._start_step():
            return None
        micro = self._parts.pop(0) if self._parts else self._formed()
        limit = self._limit
        if self._engine.oom_seen:
            assert self._former is not None
            fitting = self._engine.fitting_size(self._former.bucket, self._former.sample_bytes)
            limit = fitting if limit is None else min(limit, fitting)
        if self._first_pending and self._step_first_limit is not None:
            limit = self._step_first_limit if limit is None else min(limit, self._step_first_limit)
        if limit is not None and micro.size > limit:
            if self._engine.oom_seen:
                self._engine.note_split()
            pieces = micro.split(limit)
            self._parts[0:0] = pieces[1:]
            micro = pieces[0]
        return micro

    def _formed(self) -> _Micro:
        """The former's next batch of the current step."""
        assert self._former is not None and self._schema is not None
        batch = self._former.next_batch()
        if batch is None:
            raise RuntimeError("dynbatch core ended a training step early")
        ids = batch.ids
        undelivered = self._undelivered
        if not all(i in undelivered for i in ids):
            raise RuntimeError(f"dynbatch core delivered samples {ids} outside the current step")
        undelivered.difference_update(ids)
        self._engine.note_target(batch.target)
        kept = [self._step_kept[i] for i in ids]
        return _Micro(self._schema.batch_leaves(batch, kept), ids, batch.sequence, batch.collate_ns)

    def _start_step(self) -> bool:
        """Reads the next step's samples and hands them to the core; False at the end."""
        state = self._state
        if self._max_steps is not None and self._steps_taken >= self._max_steps:
            return False
        if self._started_ns == 0:
            self._started_ns = time.perf_counter_ns()
        while True:
            if self._epochs_left <= 0:
                return False
            plan = self._plan()
            samples = self._read_step(plan.samples)
            if samples is None:  # the epoch is over
                state.epoch += 1
                state.position = 0
                self._epochs_left -= 1
                self._order = None
                self._source = None
                continue
            positions, global_count = samples
            if not positions:  # fewer samples than ranks in this last step: all ranks drop it
                state.position += global_count
                continue
            break
        self._step_first_limit = plan.first_micro_limit
        self._step_global = global_count
        self._step_index = state.step
        self._step_epoch = state.epoch
        self._step_position = state.position
        self._step_ids = [position for position, _ in positions]
        if len(self._step_ids) > self._capacity:
            raise ValueError(
                f"a step of {len(self._step_ids)} samples on this rank exceeds the "
                f"{self._capacity} the trainer was set up for"
            )
        self._step_kept = {}
        self._limit = None
        if self._schema is None:
            self._schema = self._engine.schema_for(positions[0][1])
            # max_delay 0: once a step's samples are in, a short remainder is formed at once
            # rather than waiting for samples that belong to the next step.
            self._former = self._engine.former_for(self._schema, self._capacity, max_delay_ms=0.0)
        self._push(positions)
        return True

    def _read_step(self, size: int) -> tuple[list[tuple[int, Any]], int] | None:
        """This rank's share of the next ``size`` samples as (data position, sample) pairs,
        and the step's size over all ranks; None at the end of the epoch."""
        state = self._state
        if self._length is not None:
            remaining = self._length - state.position
            if remaining <= 0 or (self._drop_last and remaining < size):
                return None
            count = min(size, remaining)
            if self._shuffle:
                if self._order is None:
                    assert state.seed is not None
                    self._order = epoch_order(self._length, state.seed, state.epoch)
                indices = self._order[state.position : state.position + count]
            else:
                indices = list(range(state.position, state.position + count))
            low, high = _share(count, self._rank, self._world)
            data: Any = self._data
            return [(i, data[i]) for i in indices[low:high]], count
        if self._source is None:
            self._source = iter(self._data)
            for _ in range(state.position):  # resuming mid-epoch: skip what was used
                if next(self._source, _END) is _END:
                    break
        taken: list[tuple[int, Any]] = []
        for offset in range(size):
            sample = next(self._source, _END)
            if sample is _END:
                break
            taken.append((state.position + offset, sample))
        if not taken or (self._drop_last and len(taken) < size):
            return None
        low, high = _share(len(taken), self._rank, self._world)
        return taken[low:high], len(taken)

    def _push(self, positions: list[tuple[int, Any]]) -> None:
        """Admits the step's samples and hands them to the core in one push, so that the
        core never forms a partial batch of a step half pushed."""
        assert self._schema is not None and self._former is not None
        addresses: list[int] = []
        lengths: list[int] | None = [] if self._schema.padded else None
        kept = self._step_kept
        for index, sample in positions:
            kept[index] = self._schema.admit(sample, index, addresses, lengths)
        self._step_addresses = addresses
        self._step_lengths = lengths or []
        self._push_kept()

    def _push_kept(self) -> None:
        """Hands the current step's samples (kept alive in ``_step_kept``) to the core."""
        assert self._former is not None
        ids = self._step_ids
        accepted = self._former.submit_many(ids, self._step_addresses, 0, -1, self._step_lengths)
        if accepted != len(ids):
            raise RuntimeError(f"dynbatch core refused {len(ids) - accepted} samples of a step")
        self._undelivered = set(ids)
        self._parts = []
        self._yielded_in_step = 0
        self._first_pending = True

    def _restart_step(self) -> None:
        """Runs the current step again from its kept samples (after an OOM)."""
        assert self._former is not None and self._schema is not None
        while self._undelivered:  # formed or forming: take them out, unused
            batch = self._former.next_batch()
            if batch is None:
                raise RuntimeError("dynbatch core ended a training step early")
            self._undelivered.difference_update(batch.ids)
        self._push_kept()


_END = object()


def _share(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of ``count`` samples (the first ranks take one more)."""
    base, extra = divmod(count, world)
    low = rank * base + min(rank, extra)
    return low, low + base + (1 if rank < extra else 0)


def capacity_for(max_samples_per_step: int, world_size: int) -> int:
    """The most samples one rank holds in a step."""
    return max(1, math.ceil(max_samples_per_step / world_size))
