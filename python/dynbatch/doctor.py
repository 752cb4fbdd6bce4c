"""python -m dynbatch doctor: what this installation is, what it sees, and whether it works.

Prints the version and build (CUDA compiled in, architectures), whether a GPU is usable, each
GPU's NVML readings next to pynvml's (when nvidia-ml-py is installed), torch's view of the
devices, and a short self-test of the iterator and of ``submit``. Exits 0 when every
self-test passes, 1 otherwise, naming what failed.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .info import build_info, telemetry
from .processor import DynamicBatchProcessor

__all__ = ["main", "self_tests"]

_MIB = 2**20


def _pynvml_readings() -> dict[int, dict[str, Any]] | str:
    """pynvml's memory readings per NVML index, or why there are none."""
    try:
        import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as error:
        return f"pynvml could not initialize NVML: {error}"
    try:
        readings: dict[int, dict[str, Any]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            readings[index] = {"total": int(memory.total), "free": int(memory.free)}
        return readings
    finally:
        pynvml.nvmlShutdown()


def _report_devices() -> list[str]:
    info = build_info()
    snapshot = telemetry()
    lines = [
        f"dynbatch {info['version']} ({info['compiler']})",
        "CUDA compiled in: "
        + (
            f"yes, architectures {info['cuda_architectures']}, runtime "
            f"{info['cuda_runtime_version']}"
            if info["cuda_compiled"]
            else "no (a CPU-only build)"
        ),
        f"GPU usable: {'yes' if info['gpu_usable'] else 'no'} "
        f"({info['gpu_count']} device(s); {info['gpu_detail'] or 'ok'})",
        f"torch {torch.__version__}: cuda available {torch.cuda.is_available()}, "
        f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} device(s)",
    ]
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(device)
            lines.append(
                f"  torch cuda:{device} {torch.cuda.get_device_name(device)}: "
                f"{free / _MIB:,.0f} MiB free of {total / _MIB:,.0f} MiB"
            )
    host = snapshot["host"]
    lines.append(
        f"host memory: {host['memory_available_bytes'] / _MIB:,.0f} MiB available of "
        f"{host['memory_total_bytes'] / _MIB:,.0f} MiB; "
        f"this process {host['process_rss_bytes'] / _MIB:,.0f} MiB"
    )
    nvml = snapshot["nvml"]
    if not nvml["available"]:
        lines.append(f"NVML: not available ({nvml['reason']})")
        return lines
    lines.append(f"NVML: {nvml['device_count']} device(s) via {nvml['library']}")
    theirs = _pynvml_readings()
    for gpu in snapshot["gpus"]:
        ours = (
            f"{(gpu['memory_free_bytes'] or 0) / _MIB:,.0f} MiB free of "
            f"{(gpu['memory_total_bytes'] or 0) / _MIB:,.0f} MiB, "
            f"utilization {gpu['utilization'] if gpu['utilization'] is not None else '-'}"
        )
        line = f"  NVML {gpu['index']} {gpu['name']}: {ours}"
        if gpu["error"]:
            line += f" (partial: {gpu['error']})"
        if isinstance(theirs, dict) and gpu["index"] in theirs:
            other = theirs[gpu["index"]]
            line += (
                f"; pynvml: {other['free'] / _MIB:,.0f} MiB free of "
                f"{other['total'] / _MIB:,.0f} MiB"
            )
        lines.append(line)
    if isinstance(theirs, str):
        lines.append(f"  (no pynvml comparison: {theirs})")
    return lines


def _check_iterator() -> str:
    samples = [torch.full((8,), float(i)) for i in range(300)]
    with DynamicBatchProcessor(max_batch_size=32) as processor:
        seen = [int(v) for batch in processor(samples) for v in batch[:, 0].tolist()]
    if seen != list(range(300)):
        return f"the iterator returned samples {seen[:8]}... instead of 0..299 in order"
    return ""


def _check_submit() -> str:
    with DynamicBatchProcessor(model=lambda b: b[:, 0] * 2, max_batch_size=16) as processor:
        futures = [processor.submit(torch.full((4,), float(i))) for i in range(100)]
        results = [int(f.result(timeout=30).item()) for f in futures]
    if results != [2 * i for i in range(100)]:
        return f"submit returned {results[:8]}... instead of each request's own result"
    return ""


def self_tests() -> list[tuple[str, Callable[[], str]]]:
    """(name, check) pairs; a check returns "" when it passes, else what went wrong."""
    return [
        ("iterator: 300 samples, each once, in order", _check_iterator),
        ("submit: 100 requests, each gets its own result", _check_submit),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynbatch doctor", description=__doc__)
    parser.parse_args(argv)
    for line in _report_devices():
        print(line)
    failed = 0
    print("self-test:")
    for name, check in self_tests():
        try:
            problem = check()
        except Exception:
            problem = "raised:\n" + traceback.format_exc()
        print(
            f"  {'PASS' if not problem else 'FAIL'}  {name}" + (f": {problem}" if problem else "")
        )
        failed += bool(problem)
    print("all self-tests passed" if not failed else f"{failed} self-test(s) failed")
    return 1 if failed else 0
