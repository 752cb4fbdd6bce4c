"""Stats: a processor's record rendered as a table, Prometheus text or a figure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .metrics import render_prometheus
from .plots import plot_runs
from .stats_data import BatchPoint, DurationHistogram, StatsRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BatchPoint", "DurationHistogram", "Stats", "describe_learned_latency"]


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


class Stats(StatsRecord):
    """A snapshot of a processor's work so far. ``str()`` renders a table, ``to_dict()`` a dict,
    ``to_prometheus()`` the Prometheus text format and ``plot()`` a figure.

    Latency is per batch, from its first sample entering the queue to the batch reaching the
    caller. Compute is the caller's time on a batch (from the yield to the next request).
    Percentiles cover the most recent ``window`` batches; totals cover everything.
    """

    def to_prometheus(self, labels: Mapping[str, str] | None = None) -> str:
        """These stats in the Prometheus text exposition format (version 0.0.4), every sample
        carrying ``labels`` (e.g. ``{"task": "classifier"}``). Serve it on ``/metrics``."""
        return render_prometheus(self, labels or {})

    def plot(self, path: str | None = None, *, title: str = "dynbatch") -> Figure:
        """Batch size, throughput and memory over the recent window, with out-of-memory
        errors and SLO misses marked; saved to ``path`` (PNG, SVG, PDF... by its suffix) when
        given. Needs matplotlib (``pip install "dynbatch[plot]"``)."""
        return plot_runs({title: self}, path)

    def __str__(self) -> str:
        """The table: what applies to this processor (serving rows for a server only), and
        learned costs only once they are physical (never a negative time or size)."""
        histogram = ", ".join(f"{size}:{count}" for size, count in self.histogram.items())
        rows = [
            ("batches", f"{self.batches:,}"),
            ("samples", f"{self.samples:,}"),
            ("mean batch size", f"{self.mean_batch_size:.1f}"),
            ("batch sizes (size:count)", histogram or "-"),
            ("throughput", f"{self.throughput:,.0f} samples/s"),
            (
                "peak memory use",
                f"{self.peak_memory_use:.1%} of {self.memory_scope} memory"
                + (
                    f" (process peak RSS {_mib(self.peak_rss_bytes)})"
                    if self.memory_scope == "host"
                    else ""
                ),
            ),
        ]
        if self.serving:  # an iterator's batches wait on its read-ahead, not on a queue
            rows.append(
                (
                    "batch latency p50 / p99",
                    f"{self.latency_p50_ms:.3f} / {self.latency_p99_ms:.3f} ms",
                )
            )
        rows += [
            ("caller time p50 / p99", f"{self.compute_p50_ms:.3f} / {self.compute_p99_ms:.3f} ms"),
            (
                "time collating / in caller",
                f"{self.collate_seconds:.4f} s / {self.compute_seconds:.4f} s",
            ),
            (
                "target / knee / memory / OOM / SLO ceilings",
                f"{self.target_batch_size} / {self.knee} / {self.memory_ceiling} / "
                f"{self.oom_ceiling} / {self.slo_ceiling}"
                + (" (exploring)" if self.exploring else ""),
            ),
            ("learned latency a + b*n", describe_learned_latency(self)),
            (
                "learned memory m0 + m1*n",
                f"{_mib(self.memory_intercept_bytes)} + {self.memory_slope_bytes / 1024:.1f} KiB*n"
                if self.memory_slope_bytes > 0 and self.memory_intercept_bytes >= 0
                else "- (no device memory feedback)",
            ),
            ("out-of-memory errors / split batches", f"{self.ooms} / {self.split_batches}"),
            ("lowest available memory", _mib(self.min_available_bytes)),
            (
                "staging buffers",
                _mib(self.staging_bytes)
                + (f" ({_mib(self.pinned_bytes)} page-locked)" if self.pinned_bytes else ""),
            ),
            ("telemetry", self.telemetry_source),
        ]
        if self.pinned_fallbacks:
            rows.append(
                (
                    "WARNING page-locking failed",
                    f"{self.pinned_fallbacks} staging slots are pageable ({self.pinned_error}): "
                    "their copies to the device cannot overlap the model",
                )
            )
        if self.token_budget:
            rows.append(("token budget (padded tokens per batch)", f"{self.token_budget:,}"))
        if self.padding_efficiency < 1.0:
            rows.append(("padding efficiency (real / padded)", f"{self.padding_efficiency:.1%}"))
        if self.serving:
            reasons = ", ".join(f"{k}:{v}" for k, v in self.released_by.items() if v)
            rows.append(("batches released by", reasons or "-"))
            rows.append(
                (
                    "timeouts / cancellations / isolated errors",
                    f"{self.timeouts} / {self.cancellations} / {self.isolated_errors}",
                )
            )
            for priority, entry in self.priorities.items():
                rows.append(
                    (
                        f"priority {priority}: requests, wait p50 / p99",
                        f"{int(entry['dispatched']):,}, {entry['queue_wait_p50_ms']:.3f} / "
                        f"{entry['queue_wait_p99_ms']:.3f} ms",
                    )
                )
        width = max(len(name) for name, _ in rows)
        lines = ["dynbatch stats", "-" * (width + 30)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def describe_learned_latency(stats: StatsRecord) -> str:
    """The fitted line, or why there is none yet: a fit through too few or too noisy points
    can come out with a negative part, which is no cost a batch can have."""
    a, b = stats.latency_intercept_ms, stats.latency_slope_ms
    if a == 0 and b == 0:
        return "- (not measured yet)"
    if a < 0 or b < 0:
        return "- (not learned yet: times measured so far do not fit a line with positive parts)"
    return f"{a:.4f} ms + {b * 1e3:.3f} us*n"
