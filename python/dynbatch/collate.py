"""collate(samples): one batch from a list of samples, through the core's staging pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _core
from .torch_bridge import Schema

__all__ = ["collate"]

# Shared by every call: two slots so that a batch still in use does not force an allocation.
_pool = _core.StagingPool(2)


def collate(samples: Sequence[Any]) -> Any:
    """Stacks ``samples`` like ``torch.utils.data.default_collate``, copying each leaf once.

    Usable as a ``DataLoader`` ``collate_fn``. The result's tensors share one staging buffer
    that returns to the pool when they are freed.
    """
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)):
        raise TypeError(f"collate expects a sequence of samples, got {type(samples).__name__}")
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    schema = Schema(samples[0], 0)
    addresses: list[int] = []
    kept = [schema.admit(sample, index, addresses) for index, sample in enumerate(samples)]
    batch = _core.collate(schema.core_descriptors(), addresses, len(samples), _pool)
    return schema.structure(schema.batch_leaves(batch, kept))
