"""Splitting inputs across torchrun ranks and gathering the outputs back in input order.

Every rank runs the same script; each batches only its share, and rank 0 gets every output::

    # torchrun --nproc-per-node=2 infer.py
    import torch.distributed as dist
    import dynbatch as ds
    from dynbatch.distributed import gather, shard

    dist.init_process_group("gloo")  # or "nccl", after torch.cuda.set_device(local_rank)
    with ds.DynamicBatchProcessor(max_batch_size=64) as processor:
        outputs = gather(processor.map(model, shard(inputs)))
    if outputs is not None:  # rank 0: one output per input, in input order
        ...
    dist.destroy_process_group()

Without an initialized default process group (``python infer.py``), both functions act as the
only rank: ``shard`` returns the whole input and ``gather`` the outputs, so one script serves
both launches. Importing this module initializes nothing.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["gather", "shard"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _SizedIndexable(Protocol[T_co]):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


def _rank_and_world(group: ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _bounds(length: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s share: the first ``length % world`` ranks get one more."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class _Shard(Sequence[T]):
    """A read-only window [start, stop) on an indexable input; items are read on access."""

    def __init__(self, data: _SizedIndexable[T], start: int, stop: int) -> None:
        self._data = data
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        position = operator.index(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"shard index {index} out of range for {len(self)} items")
        return self._data[self._start + position]

    def __iter__(self) -> Iterator[T]:
        for position in range(self._start, self._stop):
            yield self._data[position]

    def __repr__(self) -> str:
        return f"<shard [{self._start}:{self._stop}] of {type(self._data).__name__}>"


def shard(inputs: _SizedIndexable[T], *, group: ProcessGroup | None = None) -> Sequence[T]:
    """This rank's contiguous share of ``inputs``, as a lazy read-only view.

    ``inputs`` is anything with ``len()`` and integer indexing: a list, a tuple, a tensor (its
    rows), a map-style ``torch.utils.data.Dataset`` with ``__len__``. Rank r of W gets the
    indices [start_r, stop_r): contiguous, in rank order, sizes differing by at most one (the
    first ``len(inputs) % W`` ranks get one more). Nothing is copied; an item is read from
    ``inputs`` when the view is indexed or iterated (slicing it gives a list).

    Ranks and size are those of ``group`` (default: the default process group). Without an
    initialized process group the view covers the whole input.
    """
    if not isinstance(inputs, Sized) or not hasattr(inputs, "__getitem__"):
        raise TypeError(
            "shard(inputs) needs a sized, indexable input (a list, tuple, tensor or map-style "
            f"Dataset with __len__), got {type(inputs).__name__}; for an iterator, list() it first"
        )
    if isinstance(inputs, Mapping):
        raise TypeError("shard(inputs) needs integer positions, got a mapping; pass its values")
    rank, world = _rank_and_world(group)
    start, stop = _bounds(len(inputs), rank, world)
    return _Shard(inputs, start, stop)


def _portable(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) detached, on the CPU
    and holding only its own elements."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().cpu()
        # A row split from a batch output shares the whole batch's storage, which pickling
        # would otherwise send once per row.
        if (
            copy.layout == torch.strided
            and copy.untyped_storage().nbytes() > copy.numel() * copy.element_size()
        ):
            copy = copy.clone()
        return copy
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, tuple):
        items = [_portable(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _likely_total(counts: Sequence[int]) -> int:
    """The input length whose split agrees with the most ranks' counts, so that an error can
    blame the ranks that are off. Ties go to the length nearest the counts' sum, then to the
    larger: a rank dropping samples is a likelier slip than one inventing them."""
    world, counted = len(counts), sum(counts)
    # Rank r's count n is right for exactly the lengths (n - 1) * world + r + 1 ..= n * world + r.
    lowest = sorted((n - 1) * world + rank + 1 for rank, n in enumerate(counts))
    best = (0, 0, 0)  # (ranks agreeing, -distance from the sum, length)
    for first, low in enumerate(lowest):
        high = low + world - 1
        last = bisect.bisect_right(lowest, high) - 1
        # Every length in [lowest[last], high] agrees with the ranks first..last.
        length = min(max(counted, lowest[last]), high)
        best = max(best, (last - first + 1, -abs(length - counted), length))
    return best[2]


def _check_counts(counts: Sequence[int]) -> None:
    """Raises ValueError unless ``counts`` (outputs per rank) is ``shard``'s split of a length."""
    world = len(counts)
    length = _likely_total(counts)
    expected = [stop - start for start, stop in (_bounds(length, r, world) for r in range(world))]
    wrong = [
        f"rank {rank} returned {count}, expected {want}"
        for rank, (count, want) in enumerate(zip(counts, expected, strict=True))
        if count != want
    ]
    if wrong:
        raise ValueError(
            f"gather: the outputs per rank {list(counts)} don't fit shard()'s split over "
            f"{world} ranks; most likely {length} inputs, where {'; '.join(wrong)}. Every rank "
            "must pass one output per item of its shard"
        )


def gather(
    outputs: Iterable[T], *, dst: int = 0, group: ProcessGroup | None = None
) -> list[T] | None:
    """Every rank's ``outputs`` as one list on rank ``dst``, in input order; None elsewhere.

    Every rank of ``group`` must call it (a collective), each with one output per item of its
    ``shard`` (tensors, numbers, dicts...; anything picklable). Rank ``dst`` gets the ranks'
    lists concatenated in rank order, which is the input order. ``dst`` is a rank within
    ``group``, the numbering ``shard`` uses (translated to the global rank that
    ``torch.distributed.gather_object`` expects).

    With more than one rank, tensors (also inside dicts, lists and tuples) are sent as detached
    CPU copies holding only their own elements, so the list on ``dst`` is usable there whatever
    device made them.
    With NCCL, objects travel through the current CUDA device: call
    ``torch.cuda.set_device(local_rank)`` on every rank first.

    On ``dst``, after the exchange (so that no rank is left waiting), ValueError names the
    ranks whose count does not fit ``shard``'s split. A miscount that still looks like a
    split of another length (e.g. the last rank one short, with an even split) can't be told.

    Without an initialized process group this is the only rank: the outputs come back as a
    list, as they are.
    """
    rank, world = _rank_and_world(group)
    if not 0 <= dst < world:
        raise ValueError(f"dst must be a rank in 0..{world - 1}, got {dst}")
    if world == 1:
        return list(outputs)
    gathered: list[Any] | None = [None] * world if rank == dst else None
    global_dst = dst if group is None else dist.get_global_rank(group, dst)
    dist.gather_object([_portable(item) for item in outputs], gathered, global_dst, group)
    if gathered is None:
        return None
    _check_counts([len(part) for part in gathered])
    return [item for part in gathered for item in part]
