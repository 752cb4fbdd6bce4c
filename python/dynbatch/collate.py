"""collate(samples): one batch from a list of samples, through the core's staging pool."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import _core
from .torch_bridge import Schema, stack_small, stacks_small

__all__ = ["collate"]

# Shared by every call: two slots so that a batch still in use does not force an allocation.
_pool = _core.StagingPool(2)


def _new_pool_after_fork() -> None:
    """A forked child (a DataLoader worker) collates into a pool of its own: the parent's
    may be locked by a thread that does not exist here (the core leaks it)."""
    global _pool
    _pool = _core.StagingPool(2)


os.register_at_fork(after_in_child=_new_pool_after_fork)


def collate(
    samples: Sequence[Any], *, pad_value: float | None = None, pad_to_multiple_of: int = 1
) -> Any:
    """Stacks ``samples`` like ``torch.utils.data.default_collate``, copying each leaf once.

    Usable as a ``DataLoader`` ``collate_fn``. The result's tensors share one staging buffer
    that returns to the pool when they are freed (lone tensors of up to 16 KiB are stacked
    by torch instead: one native call, cheaper than checking them one by one). With
    ``pad_value``, tensor leaves may differ in their first dimension: they are padded (like
    ``pad_sequence(batch_first=True)``, to a multiple of ``pad_to_multiple_of``) and the
    result is a ``PaddedBatch``.
    """
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise TypeError(f"collate expects a sequence of samples, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int):
        raise TypeError("pad_to_multiple_of must be an int")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
    first = samples[0]
    if pad_value is None and stacks_small(first):
        stacked = stack_small(samples, first.dtype, tuple(first.shape))
        if stacked is not None:
            return stacked
    schema = Schema(first, 0, pad_value=pad_value)
    addresses: list[int] = []
    lengths: list[int] = []
    kept = [schema.admit(sample, index, addresses, lengths) for index, sample in enumerate(samples)]
    batch = _core.collate(
        schema.core_descriptors(), addresses, len(samples), _pool, lengths, pad_to_multiple_of
    )
    return schema.structure(schema.batch_leaves(batch, kept))
