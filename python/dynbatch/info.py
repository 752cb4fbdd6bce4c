"""What this installation is and what it sees: build facts, GPU usability, telemetry."""

from __future__ import annotations

from typing import Any

from . import _core

__all__ = ["build_info", "telemetry"]


def build_info() -> dict[str, Any]:
    """Version, compiler, whether CUDA was compiled in, and whether a GPU is usable now.

    ``gpu_usable`` comes from the core's own probe (device count plus a one-thread kernel),
    not from torch, so it tells whether *this build* can use the GPU on this machine.
    """
    return dict(_core.build_info())


def telemetry() -> dict[str, Any]:
    """A fresh reading of what sizing decisions see (host memory and CPU utilization)."""
    return dict(_core.host_telemetry())
