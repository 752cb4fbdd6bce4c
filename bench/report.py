"""Runs the benchmarks (or reads a pytest-benchmark JSON) and prints each mean as a ratio.

    python bench/report.py                          # run bench/ at full size, then report
    python bench/report.py -- --bench-size=tiny     # extra arguments go to pytest
    python bench/report.py --json results.json      # report an existing run
    python bench/report.py --save results.json      # run, keep the JSON, report

Every group holds its peer; ratio = entry mean / peer mean under the same other parameters
(for collate, the same thread count), so < 1 is faster than the peer. Medians are shown too:
on a shared machine a few stalled rounds (page faults of fresh 38 MB outputs) can move a mean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# Group-name prefix -> the `impl` parameter of the peer every entry is divided by.
PEERS = {
    "queue-": "queue.Queue",
    "collate-": "torch.stack",
    "iterate-": "plain-loop",
}


def run_benchmarks(json_path: Path, pytest_args: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH_DIR),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-q",
        *pytest_args,
    ]
    print("$", " ".join(command), file=sys.stderr)
    completed = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, check=False)
    if completed.returncode != 0:
        sys.exit(f"benchmarks failed (exit {completed.returncode}); rerun the command above")


def _peer_of(group: str) -> str | None:
    for prefix, peer in PEERS.items():
        if group.startswith(prefix):
            return peer
    return None


def _format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


# Parameters the group name already tells (collate's sample shape).
_HIDDEN = {"impl", "case"}


def _entry_label(params: dict[str, Any]) -> str:
    others = [f"{key}={value}" for key, value in sorted(params.items()) if key not in _HIDDEN]
    return " ".join([str(params.get("impl", "?")), *others])


def _stat_of_peer(benches: list[dict[str, Any]], peer: str | None, others: dict[str, Any]) -> Any:
    for bench in benches:
        params = bench["params"] or {}
        if (
            params.get("impl") == peer
            and {k: v for k, v in params.items() if k != "impl"} == others
        ):
            return bench["stats"]
    return None


def report(data: dict[str, Any]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"] or "(no group)", []).append(bench)

    headers = ("group", "entry", "mean", "ratio", "median", "ratio")
    rows: list[tuple[str, ...]] = []
    for group in sorted(groups):
        benches = groups[group]
        peer = _peer_of(group)
        previous = None
        for bench in sorted(benches, key=lambda b: _entry_label(b["params"] or {})):
            params = bench["params"] or {}
            stats = bench["stats"]
            others = {k: v for k, v in params.items() if k != "impl"}
            peer_stats = _stat_of_peer(benches, peer, others)
            row = [group if group != previous else "", _entry_label(params)]
            previous = group
            for stat in ("mean", "median"):
                row.append(_format_time(stats[stat]))
                row.append(f"{stats[stat] / peer_stats[stat]:.2f}" if peer_stats else "-")
            rows.append(tuple(row))

    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [headers, *rows]
    ]
    machine = data.get("machine_info", {})
    lines.append(
        f"(ratio = time / the peer's under the same other parameters; peers: "
        f"{', '.join(PEERS.values())}; {machine.get('cpu', {}).get('brand_raw', '?')}, "
        f"{machine.get('cpu', {}).get('count', '?')} CPUs)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="report this pytest-benchmark JSON, no run")
    parser.add_argument("--save", type=Path, help="run, and keep the JSON here")
    parser.add_argument("pytest_args", nargs="*", help="after --: extra arguments for pytest")
    args = parser.parse_args(argv)

    if args.json is not None:
        data = json.loads(args.json.read_text())
    elif args.save is not None:
        run_benchmarks(args.save, args.pytest_args)
        data = json.loads(args.save.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.json"
            run_benchmarks(path, args.pytest_args)
            data = json.loads(path.read_text())
    print(report(data))


if __name__ == "__main__":
    main()
