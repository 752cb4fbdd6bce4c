"""What this installation is and what it sees: build facts, GPU usability, telemetry."""

from __future__ import annotations

from typing import Any, TypedDict

from . import _core

__all__ = [
    "GpuReading",
    "HostReading",
    "NvmlStatus",
    "TelemetrySnapshot",
    "build_info",
    "telemetry",
]


class HostReading(TypedDict):
    """Host memory (the tighter of /proc/meminfo and the cgroup limit) and this process's RSS."""

    source: str
    time_ns: int
    memory_total_bytes: int
    memory_available_bytes: int
    process_rss_bytes: int
    utilization: float


class GpuReading(TypedDict):
    """One GPU as NVML reports it; ``None`` where NVML could not read that part (see ``error``)."""

    index: int
    name: str
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    memory_used_bytes: int | None
    memory_reserved_bytes: int | None
    utilization: float | None
    memory_utilization: float | None
    error: str


class NvmlStatus(TypedDict):
    """Whether NVML could be loaded and initialized, and if not, why."""

    available: bool
    reason: str
    device_count: int
    library: str


class TelemetrySnapshot(TypedDict):
    host: HostReading
    gpus: list[GpuReading]
    nvml: NvmlStatus


def build_info() -> dict[str, Any]:
    """Version, compiler, whether CUDA was compiled in, and whether a GPU is usable now.

    ``gpu_usable`` comes from the core's own probe (device count plus a one-thread kernel),
    not from torch, so it tells whether *this build* can use the GPU on this machine.
    """
    return dict(_core.build_info())


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def telemetry() -> TelemetrySnapshot:
    """A fresh reading of what sizing decisions can see: the host and every GPU NVML sees.

    Returns a dict with three keys:

    - ``host``: ``source`` ("host"), ``time_ns``, ``memory_total_bytes``,
      ``memory_available_bytes``, ``process_rss_bytes`` and ``utilization`` (CPU, 0..1; a
      single reading has no interval to measure, so it is 0.0 here).
    - ``gpus``: one entry per device NVML sees, in NVML's order (which ignores
      ``CUDA_VISIBLE_DEVICES``): ``index``, ``name``, ``memory_total_bytes``,
      ``memory_free_bytes``, ``memory_used_bytes``, ``memory_reserved_bytes`` (reported by
      drivers with ``nvmlDeviceGetMemoryInfo_v2``, else 0), ``utilization`` (GPU busy share of
      NVML's last sample period, 0..1), ``memory_utilization`` (0..1) and ``error`` (empty when
      every NVML call succeeded; a part NVML could not read is ``None``). Empty without NVML.
    - ``nvml``: ``available``, ``reason`` (why not, empty when available), ``device_count``
      and ``library`` (the path given by ``DYNBATCH_NVML_LIBRARY``, else
      ``libnvidia-ml.so.1``).

    NVML is opened with ``dlopen`` at the first call and kept for the life of the process; a
    machine without the NVIDIA driver gets ``available=False`` and an empty ``gpus`` list.
    """
    host = _core.host_telemetry()
    status = _core.nvml_status()
    gpus: list[GpuReading] = [
        GpuReading(
            index=int(gpu["index"]),
            name=str(gpu["name"]),
            memory_total_bytes=_optional_int(gpu["memory_total_bytes"]),
            memory_free_bytes=_optional_int(gpu["memory_free_bytes"]),
            memory_used_bytes=_optional_int(gpu["memory_used_bytes"]),
            memory_reserved_bytes=_optional_int(gpu["memory_reserved_bytes"]),
            utilization=_optional_float(gpu["utilization"]),
            memory_utilization=_optional_float(gpu["memory_utilization"]),
            error=str(gpu["error"]),
        )
        for gpu in _core.nvml_devices()
    ]
    return TelemetrySnapshot(
        host=HostReading(
            source=str(host["source"]),
            time_ns=int(host["time_ns"]),
            memory_total_bytes=int(host["memory_total_bytes"]),
            memory_available_bytes=int(host["memory_available_bytes"]),
            process_rss_bytes=int(host["process_rss_bytes"]),
            utilization=float(host["utilization"]),
        ),
        gpus=gpus,
        nvml=NvmlStatus(
            available=bool(status["available"]),
            reason=str(status["reason"]),
            device_count=int(status["device_count"]),
            library=str(status["library"]),
        ),
    )
