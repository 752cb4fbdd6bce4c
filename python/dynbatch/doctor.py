"""python -m dynbatch doctor: what this installation is, what it sees, and whether it works.

Prints the version and build (CUDA compiled in, architectures), whether a GPU is usable, each
GPU's NVML readings next to pynvml's (when nvidia-ml-py is installed), torch's view of the
devices, and a short self-test of the iterator and of ``submit``. Exits 0 when every
self-test passes, 1 otherwise, naming what failed.

``--gpu`` instead proves the GPU path on this machine's card: it builds nothing, runs every
GPU-marked test (``pytest -m gpu tests``) and the GPU benchmarks (``bench/``, each against its
peer) from the source tree, and prints one table headed by the card's name, in under five
minutes. Without a usable GPU it says so and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .info import build_info, telemetry
from .processor import DynamicBatchProcessor

__all__ = ["gpu_checks", "main", "self_tests", "summarize_gpu_run"]

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


# GPU benchmark groups: (group prefix, peer impl, what the figure is, target).
_GPU_GROUPS = (
    ("gpu-h2d-", "pinned-to", "time / peer", "<= 1.11 (>= 90% of the bandwidth)"),
    ("gpu-overlap", "serial", "efficiency", "<= 1.1"),
    ("gpu-gather-", "torch.stack", "time / peer", "<= 1.0"),
    ("gpu-e2e", "DataLoader", "time / peer", "<= 0.83 (>= 1.2x)"),
)
_GPU_TIME_LIMIT_S = 280.0  # tests and benchmarks together, under the 5 minutes promised


def _source_tree() -> Path | None:
    """The checkout whose tests/ and bench/ the GPU checks run (editable install or cwd)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "tests" / "conftest.py").is_file() and (
            root / "bench" / "conftest.py"
        ).is_file():
            return root
    return None


def _test_outcomes(junit: Path) -> list[tuple[str, str]]:
    """(test id, "passed" | "failed" | "skipped: why") from a pytest JUnit XML file."""
    outcomes: list[tuple[str, str]] = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".removeprefix("tests.")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes.append((name, "FAILED"))
        elif (skipped := case.find("skipped")) is not None:
            outcomes.append((name, f"skipped: {skipped.get('message', '')}"))
        else:
            outcomes.append((name, "passed"))
    return outcomes


def _bench_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(group, entry, figure, target, met) per non-peer benchmark of a pytest-benchmark JSON."""
    rows: list[tuple[str, str, str, str, str]] = []
    benches = data.get("benchmarks", [])
    for prefix, peer, kind, target in _GPU_GROUPS:
        limit = float(target.split()[1])
        for bench in benches:
            group = bench.get("group") or ""
            params = bench.get("params") or {}
            if not group.startswith(prefix) or params.get("impl") == peer:
                continue
            others = {k: v for k, v in params.items() if k != "impl"}
            peers = [
                b
                for b in benches
                if b.get("group") == group
                and (b.get("params") or {}).get("impl") == peer
                and {k: v for k, v in (b.get("params") or {}).items() if k != "impl"} == others
            ]
            if kind == "efficiency":
                value = bench.get("extra_info", {}).get("efficiency")
            elif peers:
                value = bench["stats"]["median"] / peers[0]["stats"]["median"]
            else:
                value = None
            figure = "-" if value is None else f"{kind} {value:.2f}"
            met = "-" if value is None else ("met" if value <= limit else "MISSED")
            rows.append((group, str(params.get("impl", "?")), figure, target, met))
    return rows


def summarize_gpu_run(
    card: str, tests_junit: Path | None, bench_json: Path | None, problems: list[str]
) -> tuple[bool, list[str]]:
    """The GPU checks' table, and whether every GPU test passed and the benchmarks ran."""
    ok = not problems
    lines = [f"GPU checks on {card}, {datetime.date.today().isoformat()}"]
    rows: list[tuple[str, ...]] = []
    outcomes = _test_outcomes(tests_junit) if tests_junit and tests_junit.is_file() else []
    for name, outcome in outcomes:
        rows.append(("test", name, outcome, "", ""))
        ok = ok and outcome != "FAILED"
    if not outcomes:
        problems.append("no GPU test result was recorded")
        ok = False
    bench = json.loads(bench_json.read_text()) if bench_json and bench_json.is_file() else {}
    bench_rows = _bench_rows(bench)
    rows.extend(
        ("bench", f"{group} {entry}", figure, target, met)
        for group, entry, figure, target, met in bench_rows
    )
    if not bench_rows:
        problems.append("no GPU benchmark result was recorded")
        ok = False
    headers = ("kind", "name", "result", "target", "")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.extend(f"problem: {p}" for p in problems)
    passed = sum(outcome == "passed" for _, outcome in outcomes)
    lines.append(
        f"{passed} of {len(outcomes)} GPU tests passed; {len(bench_rows)} benchmark figures"
        + ("" if ok else " -- the GPU checks FAILED")
    )
    return ok, lines


def _run_pytest(root: Path, arguments: list[str], limit_s: float, problems: list[str]) -> None:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *arguments]
    try:
        subprocess.run(command, cwd=root, capture_output=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired:
        problems.append(f"timed out after {limit_s:.0f} s: {' '.join(command[3:])}")


def gpu_checks() -> int:
    """``doctor --gpu``: the GPU tests and benchmarks on this card, as one table."""
    info = build_info()
    if not info["gpu_usable"]:
        print(
            f"GPU checks: no usable GPU here ({info['gpu_detail']}); nothing was run. They need "
            "a machine with a CUDA GPU, torch with CUDA, and this package built with nvcc."
        )
        return 1
    root = _source_tree()
    if root is None:
        print(
            "GPU checks: they run the project's tests/ and bench/; run this from a checkout "
            "of dynbatch (an editable install or its root as the working directory)"
        )
        return 1
    card = f"{torch.cuda.get_device_name(0)} (cuda:0; {info['gpu_count']} device(s))"
    problems: list[str] = []
    started = datetime.datetime.now()
    with tempfile.TemporaryDirectory(prefix="dynbatch-doctor-") as scratch:
        junit = Path(scratch) / "tests.xml"
        bench = Path(scratch) / "bench.json"
        _run_pytest(root, ["-m", "gpu", f"--junitxml={junit}", "tests"], 150.0, problems)
        left = _GPU_TIME_LIMIT_S - (datetime.datetime.now() - started).total_seconds()
        _run_pytest(
            root,
            [
                "-m",
                "gpu",
                "--benchmark-only",
                f"--benchmark-json={bench}",
                "--benchmark-max-time=0.5",
                "--benchmark-min-rounds=3",
                "bench",
            ],
            max(left, 30.0),
            problems,
        )
        ok, lines = summarize_gpu_run(card, junit, bench, problems)
    for line in lines:
        print(line)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynbatch doctor", description=__doc__)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="run the GPU tests and benchmarks on this machine's card and print one table",
    )
    args = parser.parse_args(argv)
    if args.gpu:
        return gpu_checks()
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
