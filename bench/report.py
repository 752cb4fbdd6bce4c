"""Runs the benchmarks (or reads a pytest-benchmark JSON) and prints each mean as a ratio.

    python bench/report.py                          # run bench/ at full size, then report
    python bench/report.py -- --bench-size=tiny     # extra arguments go to pytest
    python bench/report.py --json results.json      # report an existing run
    python bench/report.py --save results.json      # run, keep the JSON, report

Every group holds its peer; ratio = entry mean / peer mean under the same other parameters
(for collate, the same thread count), so < 1 is faster than the peer. Medians are shown too:
on a shared machine a few stalled rounds (page faults of fresh 38 MB outputs) can move a mean.

The "sizing-" groups (batch sizing, issue 3) get a table of their own, in throughput: samples/s
(simulated: samples / simulated seconds, from ``extra_info``; real: samples / median wall
time), its ratio to the best fixed size of the group and to fixed 32 (> 1 is faster), and the
OOMs, lost samples and recomputed samples of each approach. The "serve-" groups (issue 4) get
theirs too: microseconds per request, and latency and throughput under load; the "noise-"
groups (issue 11) the settled size over the true knee per seed; the "minilm-embed" group (issue
11) sentences per CPU-second and per wall second against encode and a naive padded loop, and
"minilm-serve" requests/s and p50/p99 latency against a plain loop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from serving_report import SERVE_PREFIX, serving_report

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# Groups with this prefix are reported in throughput, against their fixed-size sweep.
SIZING_PREFIX = "sizing-"
# Issue 3's targets for the dynamic entries: within 5% of the best fixed size, and at least
# 1.25x fixed 32 where the best fixed size is larger than 32.
TARGET_VS_BEST, TARGET_VS_32 = 0.95, 1.25
# Issue 11: a second run with the first run's sizing profile ("-warm" entries).
TARGET_WARM = 0.98
_CLOCKS = (("cpu", "process CPU time"), ("wall", "wall time"))  # of the focused rounds

# Groups with this prefix report where the sizing settles under timing noise (issue 11).
NOISE_PREFIX = "noise-"
TOKENS_NOISE = "tokens-noise"
TARGET_BUDGET_SPREAD = 1.5  # three identical runs' token budgets within this factor
TARGET_NOISE = 1.3  # settled size within this factor of the true knee, either way
# The MiniLM embedding groups (issue 11): dynbatch against encode and a naive padded loop.
MINILM_PREFIX = "minilm-"
TARGET_VS_ENCODE, TARGET_VS_NAIVE, TARGET_BUDGET_SPREAD = 1.1, 1.5, 1.5
# The MiniLM serving group (issue 11, item 8): dynbatch against a plain loop under a lock.
MINILM_SERVE = "minilm-serve"
TARGET_SERVE_THROUGHPUT = 1.3  # at no worse p99

# Group-name prefix -> the `impl` parameter of the peer every entry is divided by.
PEERS = {
    "queue-": "queue.Queue",
    "collate-": "torch.stack",
    "iterate-": "plain-loop",
    "pad-": "pad_sequence",
    "overlap-": "DataLoader",
    "observe-progress-": "no-bar",
    "observe-scrape": "stats()",
    "sim-overlap": "serial",
    "gpu-h2d-": "pinned-to",
    "gpu-overlap": "serial",
    "gpu-gather-": "torch.stack",
    "gpu-e2e": "DataLoader",
    "priority-": "no-holds",
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


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Columns padded to fit; the first ``left`` columns flush left, the others right."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [headers, *rows]
    ]


def _machine(data: dict[str, Any]) -> str:
    cpu = data.get("machine_info", {}).get("cpu", {})
    return f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} CPUs"


def report(data: dict[str, Any]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    sizing: dict[str, list[dict[str, Any]]] = {}
    serving: dict[str, list[dict[str, Any]]] = {}
    noise: list[dict[str, Any]] = []
    tokens_noise: list[dict[str, Any]] = []
    minilm: list[dict[str, Any]] = []
    minilm_serve: list[dict[str, Any]] = []
    for bench in data["benchmarks"]:
        group = bench["group"] or "(no group)"
        if group == MINILM_SERVE:
            minilm_serve.append(bench)
        elif group.startswith(MINILM_PREFIX):
            minilm.append(bench)
        elif group == TOKENS_NOISE:
            tokens_noise.append(bench)
        elif group.startswith(NOISE_PREFIX):
            noise.append(bench)
        elif group.startswith(SIZING_PREFIX):
            sizing.setdefault(group, []).append(bench)
        elif group.startswith(SERVE_PREFIX):
            serving.setdefault(group, []).append(bench)
        else:
            groups.setdefault(group, []).append(bench)
    parts = [_peer_report(groups, data)] if groups else []
    shares = [
        f"{group} {b['params']['impl']}: the low task took {info['low_grants']} grants while the"
        f" high one took {info['high_grants']} ({info['rounds']} rounds)"
        for group, benches in sorted(groups.items())
        if group.startswith("priority-")
        for b in benches
        for info in [b["extra_info"]]
    ]
    if shares:
        parts.append("\n".join(shares))
    if sizing:
        parts.append(sizing_report(sizing, data))
    if serving:
        parts.append(serving_report(serving) + f"\n({_machine(data)})")
    if noise:
        parts.append(noise_report(noise))
    if tokens_noise:
        parts.append(tokens_noise_report(tokens_noise))
    if minilm:
        parts.append(minilm_report(minilm) + f"\n({_machine(data)})")
    if minilm_serve:
        parts.append(minilm_serving_report(minilm_serve) + f"\n({_machine(data)})")
    return "\n\n".join(parts)


def minilm_serving_report(benches: list[dict[str, Any]]) -> str:
    """Requests per wall and CPU second and p50/p99 latency (medians of the interleaved
    rounds) of each server, dynbatch's batches, and the verdict against the plain loop."""
    info = {b["params"]["impl"]: b["extra_info"] for b in benches}
    headers = ("entry", "req/s", "/loop", "req/CPU-s", "p50 ms", "p99 ms", "batch", "padding")
    loop = info.get("plain-loop", {})
    rows: list[tuple[str, ...]] = []
    for impl, entry in info.items():
        rows.append(
            (
                impl,
                f"{entry['req_per_s']:.1f}",
                f"{entry['req_per_s'] / loop['req_per_s']:.2f}" if loop else "-",
                f"{entry['req_per_cpu_s']:.1f}",
                f"{entry['p50_ms']:.1f}",
                f"{entry['p99_ms']:.1f}",
                f"{entry['mean_batch']:.1f}" if "mean_batch" in entry else "1",
                f"{entry['padding_efficiency']:.0%}" if "padding_efficiency" in entry else "-",
            )
        )
    lines = _table(headers, rows, 1)
    dyn = info.get("dynbatch")
    if dyn and loop:
        ratio = dyn["req_per_s"] / loop["req_per_s"]
        met = ratio >= TARGET_SERVE_THROUGHPUT and dyn["p99_ms"] <= loop["p99_ms"]
        lines.append(
            f"dynbatch ({dyn['requests']} requests, {dyn['clients']} closed-loop clients): "
            f"{ratio:.2f}x the plain loop's requests/s, p99 {dyn['p99_ms']:.1f} vs "
            f"{loop['p99_ms']:.1f} ms ({'met' if met else 'MISSED'}, >= "
            f"{TARGET_SERVE_THROUGHPUT}x at no worse p99); token budget per round "
            f"{[r['token_budget'] for r in dyn['rounds']]}, learned latency "
            f"{dyn['intercept_ms']:.2f} ms + {dyn['slope_us']:.1f} us per padded token"
        )
    return "\n".join(lines)


def minilm_report(benches: list[dict[str, Any]]) -> str:
    """Sentences per CPU-second and per wall second (medians of the interleaved rounds), the
    ratios to encode and to the naive loop, and dynbatch's token budget per round."""
    info = {b["params"]["impl"]: b["extra_info"] for b in benches}
    headers = ("entry", "per CPU-s", "/encode", "/naive", "per wall-s", "/encode", "/naive")
    rows: list[tuple[str, ...]] = []
    for impl, entry in info.items():
        row = [impl]
        for key in ("per_cpu_s", "per_wall_s"):
            row.append(f"{entry[key]:.1f}")
            for peer in ("encode-32", "naive-32"):
                base = info.get(peer, {}).get(key)
                row.append(f"{entry[key] / base:.2f}" if base else "-")
        rows.append(tuple(row))
    lines = _table(headers, rows, 1)
    for name in ("dynbatch-pad",):
        dyn = info.get(name)
        if dyn is None:
            continue
        budgets = dyn.get("token_budgets") or [0]
        spread = max(budgets) / min(budgets) if min(budgets) > 0 else float("inf")
        efficiency = ", ".join(f"{e:.0%}" for e in dyn.get("padding_efficiency", []))
        verdicts = []
        for peer, target in (("encode-32", TARGET_VS_ENCODE), ("naive-32", TARGET_VS_NAIVE)):
            if peer in info:
                ratio = dyn["per_cpu_s"] / info[peer]["per_cpu_s"]
                verdicts.append(
                    f"{ratio:.2f}x {peer} per CPU-s ({'met' if ratio >= target else 'MISSED'},"
                    f" >= {target})"
                )
        verdicts.append(
            f"token budget per round {budgets} (spread {spread:.2f}x: "
            f"{'met' if spread <= TARGET_BUDGET_SPREAD else 'MISSED'}, <= {TARGET_BUDGET_SPREAD})"
        )
        lines.append(
            f"{name} ({dyn['sentences']} sentences; padding efficiency per round {efficiency}): "
            + "; ".join(verdicts)
        )
    return "\n".join(lines)


def noise_report(benches: list[dict[str, Any]]) -> str:
    """Per seed: the settled size over the true knee, and whether it is within the target."""
    headers = ("group", "seed", "noise", "knee", "settled", "settled/knee", "mean n")
    rows: list[tuple[str, ...]] = []
    ratios: list[float] = []
    for bench in sorted(benches, key=lambda b: (b["group"], b["extra_info"]["seed"])):
        info = bench["extra_info"]
        ratios.append(info["settled_over_knee"])
        rows.append(
            (
                bench["group"],
                str(info["seed"]),
                f"{info['noise']:.0%}",
                str(info["knee"]),
                f"{info['settled']:g}",
                f"{info['settled_over_knee']:.2f}",
                f"{info['mean_batch']:.0f}",
            )
        )
    inside = sum(1 / TARGET_NOISE <= r <= TARGET_NOISE for r in ratios)
    lines = _table(headers, rows, 1)
    lines.append(
        f"(settled: median size of the last quarter of one cold pass; {inside} of {len(ratios)}"
        f" seeds within {TARGET_NOISE}x of the knee: "
        f"{'met' if inside == len(ratios) else 'MISSED'}; range {min(ratios):.2f}-"
        f"{max(ratios):.2f})"
    )
    return "\n".join(lines)


def tokens_noise_report(benches: list[dict[str, Any]]) -> str:
    """Per noise level (per-call noise, host-speed drift): each seed's settled token budget,
    and the triples of seeds (three identical runs) whose budgets stay within the target
    spread."""
    by_level: dict[tuple[float, float], dict[int, int]] = {}
    knees: dict[tuple[float, float], int] = {}
    for bench in benches:
        info = bench["extra_info"]
        level = (info["noise"], info.get("drift", 0.0))
        by_level.setdefault(level, {})[info["seed"]] = info["budget"]
        knees[level] = info["knee"]
    lines = []
    for level, budgets in sorted(by_level.items()):
        noise, drift = level
        name = f"tokens-noise {noise:.0%}" + (f" + {drift:.0%} drift" if drift else "")
        seeds = sorted(budgets)
        values = [budgets[seed] for seed in seeds]
        triples = [values[i : i + 3] for i in range(0, len(values) - 2, 3)]
        inside = sum(max(t) / min(t) <= TARGET_BUDGET_SPREAD for t in triples)
        lines.append(
            f"{name}: budgets {', '.join(map(str, values))} (true knee"
            f" {knees[level]} at the mean length);"
            f" spread over all {max(values) / min(values):.2f}x;"
            f" {inside} of {len(triples)} triples within {TARGET_BUDGET_SPREAD}x"
            f" (worst {max(max(t) / min(t) for t in triples):.2f}x)"
            if triples
            else f"{name}: budgets {', '.join(map(str, values))}"
        )
    return "\n".join(lines)


def _peer_report(groups: dict[str, list[dict[str, Any]]], data: dict[str, Any]) -> str:
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

    lines = _table(headers, rows, 2)
    lines.append(
        f"(ratio = time / the peer's under the same other parameters; peers: "
        f"{', '.join(PEERS.values())}; {_machine(data)})"
    )
    return "\n".join(lines)


def _entry_order(impl: str) -> tuple[int, int, str]:
    """dynamic entries first, then the fixed sweep by size, then the other approaches."""
    if impl.startswith("dynamic"):
        return (0, 0, impl)
    if impl.startswith("fixed-") and impl.removeprefix("fixed-").isdigit():
        return (1, int(impl.removeprefix("fixed-")), impl)
    return (2, 0, impl)


def _throughputs(bench: dict[str, Any]) -> tuple[float, float | None]:
    """samples/s, and (real runs only) samples/s of the best round."""
    info = bench["extra_info"]
    if info.get("kind") == "simulated":
        return float(info["samples_per_s"]), None
    samples, stats = info["samples"], bench["stats"]
    rounds = info.get("round_seconds")  # the interleaved sweep, when there is one
    if rounds:
        return samples / statistics.median(rounds), samples / min(rounds)
    return samples / stats["median"], samples / stats["min"]


def _ratio(value: float, base: float, best_value: float | None, best_base: float | None) -> str:
    if value <= 0 or base <= 0:
        return "-"
    cell = f"{value / base:.2f}"
    if best_value is not None and best_base:
        cell += f" ({best_value / best_base:.2f})"
    return cell


def _rate_cell(value: float, info: dict[str, Any]) -> str:
    """samples/s; a failed pass says why; a simulated figure that varied across rounds (the
    core's thread can form a batch before or after the previous one's feedback) shows its
    range."""
    if value <= 0:
        return f"0 ({info.get('error') or 'failed'})"
    low, high = info.get("samples_per_s_min"), info.get("samples_per_s_max")
    if low is not None and high is not None and round(low) != round(high):
        return f"{value:,.0f} [{low:,.0f}-{high:,.0f}]"
    return f"{value:,.0f}"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.0f}"


def sizing_report(groups: dict[str, list[dict[str, Any]]], data: dict[str, Any]) -> str:
    """One row per approach: throughput, ratios to the best fixed size and to fixed 32, OOMs,
    lost and recomputed samples, batch sizes; under each group, the issue's targets."""
    headers = (
        "group",
        "entry",
        "samples/s",
        "/best-fixed",
        "/fixed-32",
        "dynamic/x",
        "OOMs",
        "lost",
        "redone",
        "mean n",
        "steady n",
        "t-steady",
    )
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for group in groups:  # in the order they ran
        benches = sorted(groups[group], key=lambda b: _entry_order(b["params"]["impl"]))
        rate = {b["params"]["impl"]: _throughputs(b) for b in benches}
        fixed = {impl: r for impl, r in rate.items() if _entry_order(impl)[0] == 1}
        best_fixed = max(fixed, key=lambda impl: fixed[impl][0], default=None)
        best = rate[best_fixed][0] if best_fixed else 0.0
        f32, f32_round = rate.get("fixed-32", (0.0, None))
        best_round_fixed = max((r[1] or 0.0 for r in fixed.values()), default=None)
        dyn, dyn_round = rate.get("dynamic", rate.get("dynamic-map", (0.0, None)))
        previous = None
        for bench in benches:
            impl, info = bench["params"]["impl"], bench["extra_info"]
            value, value_round = rate[impl]
            t_steady = info.get("t_steady_s")
            rows.append(
                (
                    group if group != previous else "",
                    impl,
                    _rate_cell(value, info),
                    _ratio(value, best, value_round, best_round_fixed if value_round else None),
                    _ratio(value, f32, value_round, f32_round),
                    _ratio(dyn, value, dyn_round, value_round)
                    if not impl.startswith("dyn")
                    else "",
                    _count(info.get("ooms")),
                    _count(info.get("lost")),
                    _count(info.get("redone")),
                    _count(info.get("mean_batch")),
                    _count(info.get("steady_size")),
                    "-" if t_steady is None else f"{t_steady:.2f} s",
                )
            )
            previous = group
        notes.append(_targets(group, benches, rate, best_fixed))
    lines = _table(headers, rows, 2)
    lines += [
        "(samples/s: simulated groups: samples / simulated seconds of one cold pass, every",
        " exploration, trial, failed attempt and recomputation included; real groups: samples /",
        " median wall time of the interleaved rounds, and in parentheses the ratio of the best",
        " rounds. /best-fixed, /fixed-32: > 1 is faster; a fixed size that hits an OOM fails (0).",
        " dynamic/x: dynamic (cpu: dynamic-map) over this entry. lost: samples without an output;",
        " redone: samples computed more than once (discarded passes, search trials). steady n:",
        " median size of the last quarter of the pass's batches; t-steady: simulated time until",
        " the pass stays at >= 90% of it, from the start or from the capacity drop.",
        f" {_machine(data)})",
        *notes,
    ]
    if any(b["extra_info"].get("bench_size") == "tiny" for g in groups.values() for b in g):
        lines.append(
            "(tiny run: short passes, where a cold start weighs far more; the verdicts above are"
            " a smoke test, not figures to report)"
        )
    return "\n".join(lines)


def _targets(
    group: str,
    benches: list[dict[str, Any]],
    rate: dict[str, tuple[float, float | None]],
    best_fixed: str | None,
) -> str:
    """The issue's targets for each dynamic entry of a group: met or missed, with the figure."""
    info = benches[0]["extra_info"]
    context = f"best fixed: {best_fixed}"
    if "best_size_start" in info:
        fits = f"largest batch that fits: {info['best_size_start']}"
        if info.get("best_size_end") != info["best_size_start"]:
            fits += f", after the drop {info['best_size_end']}"
        context += f"; {fits}"
    verdicts = []
    rounds = {
        b["params"]["impl"]: b["extra_info"]["round_cpu_seconds"]
        for b in benches
        if b["extra_info"].get("round_cpu_seconds")
    }
    fixed_cpu = {
        impl: statistics.median(seconds)
        for impl, seconds in rounds.items()
        if _entry_order(impl)[0] == 1
    }
    focus = {
        clock: {
            b["params"]["impl"]: b["extra_info"][f"focus_{clock}_seconds"]
            for b in benches
            if b["extra_info"].get(f"focus_{clock}_seconds")
        }
        for clock, _ in _CLOCKS
    }
    if focus["cpu"]:  # the focused rounds: the best fixed size and the dynamic entries alone
        best_focus = benches[0]["extra_info"]["focus_reference"]
        dynamic = [impl for impl in focus["cpu"] if impl.startswith("dynamic")]
        for impl, (clock, label) in itertools.product(dynamic, _CLOCKS):
            timed = focus[clock]
            if not timed:
                continue
            rows = benches[0]["extra_info"].get(f"focus_rows_{clock}_seconds")
            if impl.startswith("dynamic-map") and rows:  # map returns rows: so does its peer
                verdicts.append(
                    _paired_verdict(impl, timed[impl], f"{best_focus}-rows", rows, label)
                    + f"; {_paired_ratio(timed[best_focus], timed[impl]):.3f}x {best_focus}"
                    " keeping batch outputs"
                )
            else:
                verdicts.append(
                    _paired_verdict(impl, timed[impl], best_focus, timed[best_focus], label)
                )
    elif fixed_cpu:
        best_cpu = min(fixed_cpu, key=lambda impl: fixed_cpu[impl])
        for impl, seconds in rounds.items():
            if impl.startswith("dynamic"):
                verdicts.append(
                    _paired_verdict(impl, seconds, best_cpu, rounds[best_cpu], "process CPU time")
                )
    best = rate[best_fixed][0] if best_fixed else 0.0
    f32 = rate.get("fixed-32", (0.0, None))[0]
    for impl, (value, _) in rate.items():
        if not impl.startswith("dynamic") or best <= 0:
            continue
        parts = []
        if not focus["cpu"]:  # else the paired verdicts above decide
            vs_best = value / best
            target = _target_of(impl)
            parts.append(
                f"{vs_best:.2f}x best fixed ({'met' if vs_best >= target else 'MISSED'}, "
                f">= {target})"
            )
        if best_fixed != "fixed-32" and f32 > 0:
            vs_32 = value / f32
            parts.append(
                f"{vs_32:.2f}x fixed-32 ({'met' if vs_32 >= TARGET_VS_32 else 'MISSED'}, "
                f">= {TARGET_VS_32})"
            )
        if parts:
            verdicts.append(f"{impl}: " + ", ".join(parts))
    return f"{group} ({context}): " + ("; ".join(verdicts) or "no dynamic entry")


def _paired_verdict(
    impl: str, seconds: list[float], best: str, best_seconds: list[float], clock: str
) -> str:
    """A dynamic entry against the best fixed size, round by round: each round's ratio
    compares passes run seconds apart, so the host's slower drift cancels; the median of the
    rounds' ratios decides, and the quartiles show how far one round strays."""
    paired = sorted(b / d for b, d in zip(best_seconds, seconds, strict=True))
    middle = statistics.median(paired)
    low, high = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
    target = _target_of(impl)
    return (
        f"{impl}: {middle:.3f}x {best} by {clock}, paired by round "
        f"(quartiles {low:.2f}-{high:.2f} over {len(paired)} rounds; "
        f"{'met' if middle >= target else 'MISSED'}, >= {target}; ratio of the medians "
        f"{statistics.median(best_seconds) / statistics.median(seconds):.3f})"
    )


def _paired_ratio(reference_seconds: list[float], seconds: list[float]) -> float:
    """The median over rounds of reference time / entry time (> 1: the entry is faster)."""
    return statistics.median(r / s for r, s in zip(reference_seconds, seconds, strict=True))


def _target_of(impl: str) -> float:
    """A dynamic entry's target against the best fixed size: warm (profiled) or cold."""
    return TARGET_WARM if impl.endswith("-warm") else TARGET_VS_BEST


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
