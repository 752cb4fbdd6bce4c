"""Per-batch memory feedback: what a batch took above what was in use, and what the
allocator holds reserved but unused (memory a bigger batch can still have)."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["CudaMemoryMonitor", "MemoryMonitor", "NoMemoryMonitor", "default_memory_monitor"]


class MemoryMonitor(Protocol):
    """Brackets the caller's work on one batch. ``end`` returns (peak bytes above the level
    at ``begin``, reclaimable bytes); 0 means unknown."""

    def begin(self) -> None:
        """Called when the batch is handed to the caller (or the model)."""

    def end(self) -> tuple[int, int]:
        """Called when the caller is done with it: (peak bytes, reclaimable bytes)."""
        ...


class NoMemoryMonitor:
    """Host tensors: torch's CPU allocator keeps no peak, so the memory model stays unfitted
    and sizing relies on the staged bytes against host headroom."""

    def begin(self) -> None:
        """Nothing to measure."""

    def end(self) -> tuple[int, int]:
        """(0, 0): unknown."""
        return (0, 0)


class CudaMemoryMonitor:
    """torch's caching allocator on one device: peak allocated, reset per batch.

    torch keeps one peak per device, so this resets ``torch.cuda.max_memory_allocated``
    for that device at every batch; code that tracks its own peak across batches should pass
    ``memory_monitor=NoMemoryMonitor()`` (sizing then relies on NVML headroom alone).
    """

    def __init__(self, device: int) -> None:
        self._device = device
        self._start = 0

    def begin(self) -> None:
        """Resets the device's peak and notes what is allocated now."""
        torch.cuda.reset_peak_memory_stats(self._device)
        self._start = torch.cuda.memory_allocated(self._device)

    def end(self) -> tuple[int, int]:
        """(the batch's peak above the start, bytes reserved by torch but unallocated)."""
        peak = torch.cuda.max_memory_allocated(self._device) - self._start
        reserved = torch.cuda.memory_reserved(self._device)
        allocated = torch.cuda.memory_allocated(self._device)
        return (max(peak, 0), max(reserved - allocated, 0))


def default_memory_monitor(device: int | None = None) -> MemoryMonitor:
    """torch's allocator on CUDA device ``device`` (default: the current one) when CUDA is
    available, else none."""
    if torch.cuda.is_available():
        return CudaMemoryMonitor(torch.cuda.current_device() if device is None else device)
    return NoMemoryMonitor()
