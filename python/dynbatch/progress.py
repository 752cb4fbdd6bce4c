"""A tqdm progress bar for a pass over an input (``processor(data, progress=True)``)."""

from __future__ import annotations

from typing import Any

from . import _core

__all__ = ["ProgressBar"]


class ProgressBar:
    """Samples done (a batch counts once its caller has finished it, so a batch split after
    running out of memory is not counted twice), samples/s, the batch size and memory in use.
    Updated once per batch, never per sample."""

    def __init__(self, total: int | None, telemetry: _core.Telemetry) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise ImportError(
                'progress=True needs tqdm: pip install "dynbatch[progress]" (or pip install tqdm)'
            ) from None
        self._telemetry = telemetry
        self._device = "GPU" if telemetry.source.startswith("nvml") else "host"
        self.bar: Any = tqdm(total=total, unit="samples", desc="dynbatch", dynamic_ncols=True)

    def done(self, batch_size: int) -> None:
        reading = self._telemetry.latest()
        total = int(reading["memory_total_bytes"])
        used = total - int(reading["memory_available_bytes"])
        self.bar.set_postfix_str(
            f"batch={batch_size}, {self._device} mem={used / 2**30:.1f}/{total / 2**30:.1f} GiB",
            refresh=False,
        )
        self.bar.update(batch_size)

    def close(self) -> None:
        self.bar.close()


def total_of(data: Any) -> int | None:
    """``len(data)`` when it has one."""
    try:
        return len(data)
    except TypeError:
        return None
