"""Variable-length samples: the batch type of padding mode and the pad value's bytes."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PaddedBatch", "pad_element_bytes", "padded_length"]


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


class PaddedBatch:
    """A batch of variable-length samples (``collate="pad"``).

    ``data`` has the samples' structure, each padded leaf stacked as ``[n, L, ...]`` (``L`` the
    longest length in the batch, rounded up to ``pad_to_multiple_of``; positions past a
    sample's length hold ``pad_value``); ``lengths`` (int64, ``[n]``) holds each sample's true
    length; ``mask`` (bool, ``[n, L]``) is True on real positions; ``indices`` (int64, ``[n]``)
    says which samples these are (their positions in the input, or the request ids), since
    ``bucket_window`` groups samples out of input order. ``len(batch)`` is ``n``.
    """

    __slots__ = ("data", "indices", "lengths", "mask")

    def __init__(
        self, data: Any, lengths: torch.Tensor, indices: torch.Tensor, padded_length: int
    ) -> None:
        self.data = data
        self.lengths = lengths
        self.indices = indices
        self.mask = torch.arange(padded_length) < lengths.unsqueeze(1)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def padded_length(self) -> int:
        """``L``: the length every padded leaf of this batch was padded to."""
        return int(self.mask.shape[1])

    def __repr__(self) -> str:
        return (
            f"PaddedBatch(samples={len(self)}, padded_length={self.padded_length}, "
            f"lengths={self.lengths.tolist()})"
        )


def pad_element_bytes(pad_value: float | int | bool, dtype: torch.dtype, path: str) -> bytes:
    """One element of ``pad_value`` in ``dtype``, as the core copies it."""
    try:
        element = torch.tensor([pad_value], dtype=dtype)
    except (TypeError, RuntimeError, OverflowError) as error:
        raise ValueError(
            f"pad_value {pad_value!r} cannot be represented in {dtype} (leaf {path or 'sample'})"
        ) from error
    exact = not dtype.is_floating_point and not dtype.is_complex  # floats round, ints must not
    if exact and element.item() != pad_value:
        raise ValueError(
            f"pad_value {pad_value!r} changes in {dtype} (leaf {path or 'sample'}): it would pad "
            f"with {element.item()!r}"
        )
    return bytes(element.view(torch.uint8).tolist())
