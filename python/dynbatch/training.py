"""The trainer's consumer: micro-batches that add up to optimizer steps.

``processor.steps(data, samples_per_step=N)`` yields ``MicroBatch`` objects. Each optimizer
step holds exactly N samples (the last of an epoch may be short, or dropped), cut into
micro-batches whose size the engine chooses as it does for inference (memory headroom,
measured throughput). A micro-batch never holds samples of two steps: the core former holds
one step's samples at a time (one formation pass per step), so every batch it forms lies
inside the step; the next step's samples go in once the current step's last micro-batch is
out of the core, so its first micro-batch is formed while the caller computes. ``weight``
is the micro-batch's share of the step, so ``loss.mean() * weight`` summed over the step's
micro-batches is the step's mean loss, and its gradient the gradient of one batch of N.

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
from .arguments import check_size
from .engine import Engine
from .errors import DynbatchError
from .progress import ProgressBar
from .torch_bridge import Schema, storage_of

__all__ = [
    "MicroBatch",
    "StepIterator",
    "StepPlan",
    "TrainingState",
    "check_step_size",
    "epoch_order",
    "open_pass",
    "open_steps",
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

    def cut(self, size: int) -> tuple[_Micro, _Micro]:
        """The first ``size`` samples and the rest (views)."""
        head = _Micro([leaf[:size] for leaf in self.leaves], self.ids[:size], self.sequence, 0)
        rest = _Micro([leaf[size:] for leaf in self.leaves], self.ids[size:], self.sequence, 0)
        head.collate_ns = self.collate_ns
        return head, rest

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


class _Step:
    """One optimizer step as this rank holds it: its samples, kept alive until it is done,
    under core ids unique in the pass (a sample may come again in the next epoch's step)."""

    __slots__ = (
        "addresses",
        "epoch",
        "first_limit",
        "ids",
        "index",
        "kept",
        "lengths",
        "positions",
        "pushed",
        "samples",
        "start",
    )

    def __init__(self, index: int, epoch: int, start: int, samples: int) -> None:
        self.index = index
        self.epoch = epoch
        self.start = start  # where it begins in the epoch's order
        self.samples = samples  # over all ranks
        self.ids: list[int] = []
        self.positions: dict[int, int] = {}  # core id -> position in the data
        # core id -> what admit() returned, tensors as their storage: the caller may swap a
        # tensor's storage before the core has copied it.
        self.kept: dict[int, Any] = {}
        self.addresses: list[int] = []  # leaf addresses, sample-major (pushed again on a redo)
        self.lengths: list[int] = []
        self.first_limit: int | None = None
        self.pushed = False


class StepIterator(Iterator[MicroBatch]):
    """Micro-batches of optimizer steps over ``data`` (see the module's docstring).

    ``plan(step)`` gives each step's size when it is prepared: once the caller holds a step's
    last micro-batch, the next step's samples go to the core, which forms its first
    micro-batch while the caller computes (``ahead``; without it, when the caller asks for
    it: a ``plan`` that talks to other ranks must run where every rank calls it alike).
    ``epochs`` counts the epoch ends this pass crosses (a pass that starts mid-epoch first
    finishes that epoch); ``max_steps`` stops it sooner. ``state`` says where the first step
    not yet done begins: a step counts as done once its last micro-batch has been yielded
    (``report_oom`` on that micro-batch takes it back).
    """

    def __init__(
        self,
        engine: Engine,
        data: Iterable[Any],
        state: TrainingState,
        plan: Callable[[int], StepPlan],
        *,
        capacity: int,
        epochs: int,
        max_steps: int | None,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        progress: ProgressBar | None = None,
        ahead: bool = True,
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
        self._shuffle = shuffle
        self._drop_last = drop_last
        self._rank = rank
        self._world = world_size
        self._progress = progress
        self._ahead = ahead
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
        if self._length is not None and state.position >= self._length > 0:
            state.epoch, state.position = state.epoch + 1, 0  # stopped right at an epoch's end
        # Where the next step to prepare begins, and what was read there.
        self._epoch = state.epoch
        self._position = state.position
        self._next_index = state.step
        self._prepared = 0
        self._order: list[int] | None = None  # this epoch's order (shuffled)
        self._source: Iterator[Any] | None = None  # this epoch's samples (unindexed data)
        self._next_id = 0  # core ids, unique in the pass
        self._schema: Schema | None = None
        self._former: _core.BatchFormer | None = None
        self._step: _Step | None = None  # the step being yielded
        self._next: _Step | None = None  # prepared after the step's last micro-batch
        self._next_known = False  # _next was looked for (None then: the pass ends)
        self._undelivered: set[int] = set()  # core ids pushed and not yet formed
        self._parts: list[_Micro] = []
        self._limit: int | None = None  # micro-batch ceiling for this step after an OOM
        self._yielded_in_step = 0
        self._first_pending = True
        self._current: _Micro | None = None
        self._current_last = False
        self._done_in_step = 0  # samples of the step whose micro-batch finished (progress)
        self.read_ns = 0  # time spent reading, checking and pushing steps' samples
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
            if micro is None:
                self.close()
                raise StopIteration
            step = self._step
            assert step is not None and self._schema is not None
            self._yielded_in_step += micro.size
            last = self._yielded_in_step == len(step.ids)
            if last:  # every sample of the step is out of the core: the next may go in
                if not self._next_known and self._ahead:
                    self._prepare_next()
                elif self._next is not None and not self._next.pushed:
                    self._push(self._next)  # prepared before an OOM redid this step
                self._complete(step)
        except BaseException:
            self.close()
            raise
        self._current = micro
        self._current_last = last
        first = self._first_pending
        self._first_pending = False
        batch = MicroBatch(
            data=self._schema.structure(micro.leaves),
            size=micro.size,
            weight=micro.size * self._world / step.samples,
            step=step.index,
            epoch=step.epoch,
            first=first,
            last=last,
            step_samples=step.samples,
            indices=[step.positions[i] for i in micro.ids],
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
        assert self._former is not None and self._step is not None
        chunk = self._engine.after_oom(micro.size, self._former.bucket, self._former.sample_bytes)
        if chunk is None:
            error = DynbatchError(
                f"sample {self._step.positions[micro.ids[0]]} alone does not fit in memory; it "
                "cannot be split further"
            )
            self.close()
            raise error
        self._limit = chunk if self._limit is None else min(self._limit, chunk)
        step = self._step
        state = self._state
        state.epoch, state.position, state.step = step.epoch, step.start, step.index
        # Whatever the core holds (the step's rest, or the next step pushed ahead) comes out
        # unused; the step goes in again, and the next one after its last micro-batch.
        while self._undelivered:
            batch = self._former.next_batch()
            if batch is None:
                raise RuntimeError("dynbatch core ended a training step early")
            self._undelivered.difference_update(batch.ids)
        if self._next is not None:
            self._next.pushed = False
        self._push(step)
        self._yielded_in_step = 0
        self._done_in_step = 0
        self._first_pending = True
        self._parts = []

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
        if self._schema is not None:
            self._engine.pass_ended()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._step = self._next = None
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
        self._done_in_step += micro.size
        if self._current_last:  # counted per step: an OOM redo never counts a sample twice
            if self._progress is not None:
                self._progress.done(self._done_in_step)
            self._done_in_step = 0

    def _next_micro(self) -> _Micro | None:
        """The next micro-batch to yield; None when the pass is over."""
        step = self._step
        if step is None or self._yielded_in_step == len(step.ids):
            if not self._next_known:
                self._prepare_next()
            step, self._next, self._next_known = self._next, None, False
            if step is None:
                return None
            if not step.pushed:
                self._push(step)
            self._step = step
            self._limit = None
            self._yielded_in_step = 0
            self._first_pending = True
            self._parts = []
        micro = self._parts.pop(0) if self._parts else self._formed(step)
        limit = self._limit
        if self._engine.oom_seen:
            assert self._former is not None
            fitting = self._engine.fitting_size(self._former.bucket, self._former.sample_bytes)
            limit = fitting if limit is None else min(limit, fitting)
        if limit is not None and micro.size > limit:
            if self._engine.oom_seen:
                self._engine.note_split()
            pieces = micro.split(limit)
            self._parts[0:0] = pieces[1:]
            micro = pieces[0]
        first_limit = step.first_limit
        if self._first_pending and first_limit is not None and micro.size > first_limit:
            # a small first micro-batch measures the noise; the rest stays whole
            micro, rest = micro.cut(first_limit)
            self._parts.insert(0, rest)
        return micro

    def _formed(self, step: _Step) -> _Micro:
        """The former's next batch, which holds samples of ``step`` only."""
        assert self._former is not None and self._schema is not None
        batch = self._former.next_batch()
        if batch is None:
            raise RuntimeError("dynbatch core ended a training step early")
        ids = batch.ids
        if not all(i in step.kept for i in ids):
            raise RuntimeError(f"dynbatch core delivered samples {ids} outside the current step")
        self._undelivered.difference_update(ids)
        self._engine.note_target(batch.target)
        leaves = self._schema.batch_leaves(batch, [step.kept[i] for i in ids])
        if self._schema.padded:  # PaddedBatch.indices: positions in the data, not core ids
            leaves[-1] = torch.tensor([step.positions[i] for i in ids], dtype=torch.int64)
        leaves = self._engine.to_device(leaves, batch)  # device=: copied on the core's stream
        return _Micro(leaves, ids, batch.sequence, batch.collate_ns)

    def _complete(self, step: _Step) -> None:
        """The step's last micro-batch is out: the state moves to where the next begins."""
        state = self._state
        state.step = step.index + 1
        nxt = self._next
        if nxt is not None:
            state.epoch, state.position = nxt.epoch, nxt.start
        elif self._next_known or not self._ahead:  # the pass ends, or the next is not read yet
            state.epoch, state.position = self._epoch, self._position

    def _prepare_next(self) -> None:
        """Reads the next step's samples and hands them to the core (``_next``; None at the
        end of the pass)."""
        self._next_known = True
        self._next = None
        if self._max_steps is not None and self._prepared >= self._max_steps:
            return
        if self._started_ns == 0:
            self._started_ns = time.perf_counter_ns()
        while True:
            if self._epochs_left <= 0:
                return
            plan = self._plan(self._next_index)
            reading = time.perf_counter_ns()
            read = self._read_step(plan.samples)
            if read is None:  # the epoch is over
                self._epoch += 1
                self._position = 0
                self._epochs_left -= 1
                self._order = None
                self._source = None
                continue
            samples, count = read
            start = self._position
            self._position += count
            if samples:
                break
            # fewer samples than ranks in this last step: every rank drops it
        step = _Step(self._next_index, self._epoch, start, count)
        step.first_limit = plan.first_micro_limit
        if len(samples) > self._capacity:
            raise ValueError(
                f"a step of {len(samples)} samples on this rank exceeds the {self._capacity} "
                "the trainer was set up for"
            )
        if self._schema is None:
            self._schema = self._engine.schema_for(samples[0][1])
            # max_delay 0: once a step's samples are in, a short remainder is formed at once
            # rather than waiting for samples that belong to the next step.
            self._former = self._engine.former_for(self._schema, self._capacity, max_delay_ms=0.0)
        lengths: list[int] | None = [] if self._schema.padded else None
        for position, sample in samples:
            core_id = self._next_id
            self._next_id += 1
            step.kept[core_id] = storage_of(
                self._schema.admit(sample, position, step.addresses, lengths)
            )
            step.positions[core_id] = position
            step.ids.append(core_id)
        step.lengths = lengths or []
        self.read_ns += time.perf_counter_ns() - reading
        self._next_index += 1
        self._prepared += 1
        self._next = step
        if self._step is None or self._yielded_in_step == len(self._step.ids):
            self._push(step)  # the core holds nothing of the current step: no batch can straddle

    def _read_step(self, size: int) -> tuple[list[tuple[int, Any]], int] | None:
        """This rank's share of the next ``size`` samples as (data position, sample) pairs,
        and the step's size over all ranks; None at the end of the epoch."""
        if self._length is not None:
            remaining = self._length - self._position
            if remaining <= 0 or (self._drop_last and remaining < size):
                return None
            count = min(size, remaining)
            if self._shuffle:
                if self._order is None:
                    assert self._state.seed is not None
                    self._order = epoch_order(self._length, self._state.seed, self._epoch)
                indices = self._order[self._position : self._position + count]
            else:
                indices = list(range(self._position, self._position + count))
            low, high = _share(count, self._rank, self._world)
            data: Any = self._data
            return [(i, data[i]) for i in indices[low:high]], count
        if self._source is None:
            self._source = iter(self._data)
            for _ in range(self._position):  # resuming mid-epoch: skip what was used
                if next(self._source, _END) is _END:
                    break
        taken: list[tuple[int, Any]] = []
        for offset in range(size):
            sample = next(self._source, _END)
            if sample is _END:
                break
            taken.append((self._position + offset, sample))
        if not taken or (self._drop_last and len(taken) < size):
            return None
        low, high = _share(len(taken), self._rank, self._world)
        return taken[low:high], len(taken)

    def _push(self, step: _Step) -> None:
        """Hands the step's samples to the core in one push, so that the core never forms a
        partial batch of a step half pushed."""
        assert self._former is not None
        accepted = self._former.submit_many(step.ids, step.addresses, 0, -1, step.lengths)
        if accepted != len(step.ids):
            raise RuntimeError(
                f"dynbatch core refused {len(step.ids) - accepted} samples of a step"
            )
        self._undelivered.update(step.ids)
        step.pushed = True


_END = object()


def _share(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of ``count`` samples (the first ranks take one more)."""
    base, extra = divmod(count, world)
    low = rank * base + min(rank, extra)
    return low, low + base + (1 if rank < extra else 0)


def check_step_size(engine: Engine, value: object, name: str = "samples_per_step") -> int:
    """A step size: a positive int, at least the processor's min_batch_size."""
    size = check_size(name, value)
    low = engine.options.min_batch_size
    if size < low:
        raise ValueError(
            f"{name} ({size}) must be at least min_batch_size ({low}): a step is cut into "
            "micro-batches of at least that many samples"
        )
    return size


def open_pass(
    engine: Engine,
    state: TrainingState,
    data: Iterable[Any],
    plan: Callable[[int], StepPlan],
    max_samples_per_step: int,
    *,
    epochs: int,
    shuffle: bool,
    seed: int | None,
    drop_last: bool,
    max_steps: int | None,
    rank: int,
    world_size: int,
    progress: bool,
    ahead: bool = True,
) -> StepIterator:
    """A training pass over ``data`` after checking the pass's arguments (``steps`` and
    ``fit`` share it)."""
    check_size("epochs", epochs)
    if max_steps is not None:
        check_size("max_steps", max_steps)
    for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if state.position > 0 and state.seed is not None and seed != state.seed:
            raise ValueError(
                f"seed={seed} differs from the seed ({state.seed}) of the epoch in progress "
                f"({state.position} samples into epoch {state.epoch})"
            )
        state.seed = seed
    try:
        iter(data)
    except TypeError:
        raise TypeError(
            f"training data must be an iterable of samples, got {type(data).__name__}"
        ) from None
    total = length_of(data)
    bar = (
        ProgressBar(None if total is None else total * epochs, engine.telemetry)
        if progress
        else None
    )
    return StepIterator(
        engine,
        data,
        state,
        plan,
        capacity=max(1, math.ceil(max_samples_per_step / world_size)),
        epochs=epochs,
        max_steps=max_steps,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        progress=bar,
        ahead=ahead,
    )


def open_steps(
    engine: Engine,
    state: TrainingState,
    data: Iterable[Any],
    *,
    samples_per_step: int,
    epochs: int,
    shuffle: bool,
    seed: int | None,
    drop_last: bool,
    max_steps: int | None,
    process_group: Any,
    progress: bool,
) -> StepIterator:
    """``processor.steps``: a pass of fixed steps, shared among ``process_group``'s ranks."""
    size = check_step_size(engine, samples_per_step)
    rank, world = 0, 1
    if process_group is not None:
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
        world = dist.get_world_size(process_group)
    return open_pass(
        engine,
        state,
        data,
        lambda step: StepPlan(size),
        size,
        epochs=epochs,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        max_steps=max_steps,
        rank=rank,
        world_size=world,
        progress=progress,
    )
