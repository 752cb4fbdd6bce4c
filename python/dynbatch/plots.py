"""Pictures of a run: batch size, throughput and memory over time (matplotlib, optional).

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so plotting neither needs a display
nor changes the application's matplotlib backend or global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .stats_data import BatchPoint, StatsRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_runs"]

# Throughput is smoothed over this many batches: one batch's rate is mostly noise.
_THROUGHPUT_WINDOW = 8


def _throughput(points: list[BatchPoint]) -> tuple[list[float], list[float]]:
    """Samples per second over the last few batches, at each batch's delivery."""
    times: list[float] = []
    rates: list[float] = []
    for i in range(1, len(points)):
        start = max(0, i - _THROUGHPUT_WINDOW)
        elapsed = points[i].seconds - points[start].seconds
        if elapsed > 0:
            times.append(points[i].seconds)
            rates.append(sum(p.size for p in points[start + 1 : i + 1]) / elapsed)
    return times, rates


def plot_runs(runs: Mapping[str, StatsRecord], path: str | None = None) -> Figure:
    """One figure for one or more runs (overlaid, each on its own time line from its first
    batch): batch size and target, throughput, memory in use; out-of-memory errors as
    vertical lines, batches slower than ``latency_slo_ms`` as crosses. Saved to ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'plotting needs matplotlib: pip install "dynbatch[plot]" (or pip install matplotlib)'
        ) from None
    figure = Figure(figsize=(10, 8), layout="constrained")
    size_axes, rate_axes, memory_axes = figure.subplots(3, 1, sharex=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    sources: set[str] = set()
    for index, (name, stats) in enumerate(runs.items()):
        color = colors[index % len(colors)]
        points = stats.timeline
        seconds = [p.seconds for p in points]
        sources.add(stats.telemetry_source)
        size_axes.step(seconds, [p.size for p in points], where="post", color=color, label=name)
        size_axes.plot(seconds, [p.target for p in points], color=color, linestyle=":", linewidth=1)
        rate_axes.plot(*_throughput(points), color=color, label=name)
        memory_axes.plot(
            seconds, [p.memory_used_bytes / 2**30 for p in points], color=color, label=name
        )
        slo = stats.latency_slo_ms
        if slo is not None:
            missed = [p for p in points if p.compute_ms > slo]
            size_axes.scatter(
                [p.seconds for p in missed],
                [p.size for p in missed],
                marker="x",
                color="red",
                zorder=3,
                label=f"{name}: SLO misses (> {slo:g} ms)" if missed else None,
            )
        for axes in (size_axes, rate_axes, memory_axes):
            for n, moment in enumerate(stats.oom_seconds):
                axes.axvline(
                    moment,
                    color="red",
                    linestyle="--",
                    linewidth=1,
                    label=f"{name}: out of memory" if n == 0 and axes is size_axes else None,
                )
    size_axes.set_ylabel("batch size\n(dotted: target)")
    rate_axes.set_ylabel("samples / s")
    device = "device" if any(s.startswith("nvml") for s in sources) else "host"
    memory_axes.set_ylabel(f"{device} memory\nin use (GiB)")
    memory_axes.set_xlabel("seconds since the first batch (recent window)")
    for axes in (size_axes, rate_axes, memory_axes):
        axes.grid(alpha=0.3)
    size_axes.legend(loc="best", fontsize="small")
    figure.suptitle(", ".join(runs))
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
