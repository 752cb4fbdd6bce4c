"""The serving groups of ``report.py``: per-request overhead (``serve-threads-*``,
``serve-bulk``, ``serve-async``) and open-loop load (``serve-load-*``), each with issue 4's
targets marked met or MISSED."""

from __future__ import annotations

from typing import Any

SERVE_PREFIX = "serve-"
LOAD_PREFIX = "serve-load-"
OURS = "dynbatch"
# Issue 4: >= 5x lower overhead per request than the best peer; <= 2 us with submit_many.
TARGET_OVERHEAD_RATIO, TARGET_BULK_US = 5.0, 2.0


def _impl(bench: dict[str, Any]) -> str:
    return str((bench["params"] or {}).get("impl", "?"))


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [headers, *rows]
    ]


def overhead_report(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    headers = ("group", "entry", "us/request", "peer/x", "best peer/x")
    rows: list[tuple[str, ...]] = []
    verdicts: list[str] = []
    for group in sorted(groups):
        per_request = {
            _impl(b): b["stats"]["median"] / b["extra_info"]["requests"] * 1e6
            for b in groups[group]
        }
        peers = {impl: us for impl, us in per_request.items() if impl != OURS}
        best_peer = min(peers.values(), default=0.0)
        plain = per_request.get("plain-batcher", 0.0)
        for index, (impl, us) in enumerate(sorted(per_request.items(), key=lambda kv: kv[1])):
            rows.append(
                (
                    group if index == 0 else "",
                    impl,
                    f"{us:.2f}",
                    f"{plain / us:.2f}" if plain else "-",
                    f"{best_peer / us:.2f}" if best_peer else "-",
                )
            )
        ours = per_request.get(OURS)
        if ours and best_peer:
            ratio = best_peer / ours
            verdict = (
                f"{group}: {ratio:.2f}x lower than the best peer "
                f"({'met' if ratio >= TARGET_OVERHEAD_RATIO else 'MISSED'}, >= "
                f"{TARGET_OVERHEAD_RATIO:g}x)"
            )
            if group == "serve-bulk":
                verdict += (
                    f"; {ours:.2f} us per request with submit_many "
                    f"({'met' if ours <= TARGET_BULK_US else 'MISSED'}, <= {TARGET_BULK_US:g} us)"
                )
            verdicts.append(verdict)
    lines = _table(headers, rows)
    lines.append("(us/request: median round time / requests; x/ columns: > 1 is dynbatch faster)")
    return lines + verdicts


def load_report(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    headers = ("group", "entry", "offered/s", "achieved/s", "p50 ms", "p99 ms")
    rows: list[tuple[str, ...]] = []
    verdicts: list[str] = []
    for group in sorted(groups):
        info = {_impl(b): b["extra_info"] for b in groups[group]}
        for index, (impl, figures) in enumerate(sorted(info.items())):
            rows.append(
                (
                    group if index == 0 else "",
                    impl,
                    f"{figures['offered']:,.0f}" if figures["offered"] else "all at once",
                    f"{figures['throughput']:,.0f}",
                    f"{figures['p50_ms']:.2f}",
                    f"{figures['p99_ms']:.2f}",
                )
            )
        ours = info.get(OURS)
        peers = {impl: f for impl, f in info.items() if impl != OURS}
        if not ours or not peers:
            continue
        if group.endswith("burst"):
            best = max(f["throughput"] for f in peers.values())
            ratio = ours["throughput"] / best
            verdicts.append(
                f"{group}: throughput {ratio:.2f}x the best peer's "
                f"({'met' if ratio > 1 else 'MISSED'}, higher)"
            )
        else:
            lowest = min(f["p99_ms"] for f in peers.values())
            met = ours["p99_ms"] < lowest
            verdicts.append(
                f"{group}: p99 {ours['p99_ms']:.2f} ms vs the best peer's {lowest:.2f} ms "
                f"({'met' if met else 'MISSED'}, lower at the same offered load)"
            )
    lines = _table(headers, rows)
    lines.append("(latency: scheduled arrival to completion; achieved: requests / last completion)")
    return lines + verdicts


def serving_report(groups: dict[str, list[dict[str, Any]]]) -> str:
    load = {g: b for g, b in groups.items() if g.startswith(LOAD_PREFIX)}
    overhead = {g: b for g, b in groups.items() if not g.startswith(LOAD_PREFIX)}
    parts: list[str] = []
    if overhead:
        parts.append("\n".join(overhead_report(overhead)))
    if load:
        parts.append("\n".join(load_report(load)))
    return "\n\n".join(parts)
