"""What a processor did, as plain data built from the core's counters and per-batch records.

The bottom of the Python layer's rendering: ``stats`` (the table and the public ``Stats``),
``metrics`` and ``plots`` read these records; nothing here imports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = ["BatchPoint", "DurationHistogram", "StatsRecord"]

_Record = TypeVar("_Record", bound="StatsRecord")


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class DurationHistogram:
    """Durations as Prometheus keeps them: how many were below each upper edge (cumulative,
    exact at these powers of two from ~1 us to ~69 s), their count and their sum."""

    upper_edges_seconds: tuple[float, ...]
    cumulative_counts: tuple[int, ...]
    count: int
    sum_seconds: float

    @classmethod
    def from_core(cls, histogram: Mapping[str, Any]) -> DurationHistogram:
        """From the core's histogram: (edge ns, count below) pairs, count and sum."""
        buckets = histogram["buckets"]
        return cls(
            tuple(int(edge) / 1e9 for edge, _ in buckets),
            tuple(int(below) for _, below in buckets),
            int(histogram["count"]),
            float(histogram["sum_ns"]) / 1e9,
        )


@dataclass(frozen=True)
class BatchPoint:
    """One batch of the recent window, for plots: when it reached the caller (seconds since
    the window's first batch), its size and target, the caller's time on it (all its parts
    together when it was split; -1: not reported) and the memory in use (total - available)
    when it was formed."""

    seconds: float
    size: int
    target: int
    compute_ms: float
    memory_used_bytes: int


@dataclass(frozen=True)
class StatsRecord:
    """A snapshot of a processor's work so far, as data; ``to_dict()`` gives a dict.

    Latency is per batch, from its first sample entering the queue to the batch reaching the
    caller. Compute is the caller's time on a batch (from the yield to the next request).
    Percentiles cover the most recent ``window`` batches; totals cover everything.
    """

    batches: int
    samples: int
    mean_batch_size: float
    histogram: dict[int, int]
    throughput: float  # samples per second of active iteration
    active_seconds: float
    latency_p50_ms: float
    latency_p99_ms: float
    compute_p50_ms: float
    compute_p99_ms: float
    collate_seconds: float
    compute_seconds: float
    target_batch_size: int
    memory_ceiling: int
    oom_ceiling: int
    slo_ceiling: int
    knee: int
    exploring: bool
    ooms: int
    split_batches: int  # batches delivered in parts after an out-of-memory error
    latency_intercept_ms: float  # learned L(n) = a + b*n
    latency_slope_ms: float
    memory_intercept_bytes: float  # learned M(n) = m0 + m1*n (GPU peak memory)
    memory_slope_bytes: float
    peak_rss_bytes: int
    min_available_bytes: int
    memory_total_bytes: int
    staging_bytes: int
    telemetry_source: str
    window: int
    recent_batch_sizes: list[int] = field(default_factory=list)
    # Serving: why batches left the queue, and what became of requests, per priority.
    released_by: dict[str, int] = field(default_factory=dict)  # full/max_delay/deadline/drain
    priorities: dict[int, dict[str, float]] = field(default_factory=dict)
    timeouts: int = 0
    cancellations: int = 0
    isolated_errors: int = 0
    queued: int = 0  # requests waiting right now
    # collate="pad": real rows / rows after padding, over every padded batch (1.0: none).
    padding_efficiency: float = 1.0
    # collate="pad": the padded tokens (samples x padded length) the sizing allows a batch; its
    # latency and memory lines are then per token, and the ceilings above are samples of the
    # longest length seen. 0: sizes are sample counts.
    token_budget: int = 0
    memory_available_bytes: int = 0  # the latest reading
    # Peak memory use as a share of what the device allows (the lecture's "memory use"): on a
    # GPU (NVML telemetry) the device's fullest moment, (total - lowest available) / total; on
    # the host this process's peak resident size / the memory it may use (cgroup or machine).
    peak_memory_use: float = 0.0
    memory_scope: str = "host"  # "GPU" or "host": what peak_memory_use is a share of
    serving: bool = False  # requests (submit/infer) rather than passes over an input
    # device=: staging slots are page-locked; when pinning fails they are pageable instead
    # (copies then cannot overlap), counted here with the reason.
    pinned_bytes: int = 0
    pinned_fallbacks: int = 0
    pinned_error: str = ""
    # Prometheus-style histograms (totals, not the window): the caller's (or model's) time per
    # call (a batch, or each part of a split one), and each priority's queue wait.
    compute_histogram: DurationHistogram | None = field(default=None, repr=False)
    queue_wait_histograms: dict[int, DurationHistogram] = field(default_factory=dict, repr=False)
    # For plots: the recent window's batches, out-of-memory errors (seconds on the same
    # time line; earlier ones are dropped) and the SLO that batches are checked against.
    # Left out of repr(): thousands of points.
    timeline: list[BatchPoint] = field(default_factory=list, repr=False)
    oom_seconds: list[float] = field(default_factory=list, repr=False)
    latency_slo_ms: float | None = None

    @classmethod
    def from_core(
        cls: type[_Record],
        snapshot: dict[str, Any],
        live_active_ns: int,
        sizing: dict[str, Any],
        telemetry: dict[str, Any],
        pool: dict[str, Any],
        split_batches: int,
        *,
        isolated_errors: int = 0,
        queued: int = 0,
        oom_times_ns: list[int] | None = None,
        latency_slo_ms: float | None = None,
        serving: bool = False,
    ) -> _Record:
        """Built from the core's recorder snapshot, the sizing state, a telemetry reading and
        the staging pool's stats (what ``Engine.stats`` gathers)."""
        records = snapshot["recent"]
        total_bytes = int(telemetry["total_bytes"])
        on_gpu = str(telemetry["source"]).startswith("nvml")
        peak_used = (
            total_bytes - int(telemetry["min_available_bytes"])
            if on_gpu
            else int(telemetry["peak_rss_bytes"])
        )
        origin_ns = int(records[0][5]) if records else 0
        # record: (sequence, size, target, first_enqueue, formed, delivered, collate, compute, mem)
        latencies = [(r[5] - r[3]) / 1e6 for r in records]
        computes = [r[7] / 1e6 for r in records if r[7] >= 0]
        batches = int(snapshot["batches"])
        samples = int(snapshot["samples"])
        priorities = {
            int(priority): {
                "dispatched": int(entry["dispatched"]),
                "timeouts": int(entry["timed_out"]),
                "cancellations": int(entry["cancelled"]),
                "isolated_errors": int(entry["failed"]),
                "queue_wait_p50_ms": int(entry["queue_wait_p50_ns"]) / 1e6,
                "queue_wait_p99_ms": int(entry["queue_wait_p99_ns"]) / 1e6,
            }
            for priority, entry in sorted(snapshot["priorities"].items())
        }
        active_ns = int(snapshot["active_ns"]) + live_active_ns
        return cls(
            batches=batches,
            samples=samples,
            mean_batch_size=samples / batches if batches else 0.0,
            histogram={int(k): int(v) for k, v in sorted(snapshot["histogram"].items())},
            throughput=samples / (active_ns / 1e9) if active_ns > 0 else 0.0,
            active_seconds=active_ns / 1e9,
            latency_p50_ms=_percentile(latencies, 0.50),
            latency_p99_ms=_percentile(latencies, 0.99),
            compute_p50_ms=_percentile(computes, 0.50),
            compute_p99_ms=_percentile(computes, 0.99),
            collate_seconds=int(snapshot["collate_ns"]) / 1e9,
            compute_seconds=int(snapshot["compute_ns"]) / 1e9,
            target_batch_size=int(sizing["target"]),
            memory_ceiling=int(sizing["memory_ceiling"]),
            oom_ceiling=int(sizing["oom_ceiling"]),
            slo_ceiling=int(sizing["slo_ceiling"]),
            knee=int(sizing["knee"]),
            exploring=bool(sizing["exploring"]),
            ooms=int(sizing["ooms"]),
            split_batches=split_batches,
            latency_intercept_ms=float(sizing["latency_intercept_ns"]) / 1e6,
            latency_slope_ms=float(sizing["latency_slope_ns"]) / 1e6,
            memory_intercept_bytes=float(sizing["memory_intercept_bytes"]),
            memory_slope_bytes=float(sizing["memory_slope_bytes"]),
            peak_rss_bytes=int(telemetry["peak_rss_bytes"]),
            min_available_bytes=int(telemetry["min_available_bytes"]),
            memory_total_bytes=int(telemetry["total_bytes"]),
            staging_bytes=int(pool["pooled_bytes"]),
            telemetry_source=str(telemetry["source"]),
            window=len(records),
            recent_batch_sizes=[int(r[1]) for r in records[-32:]],
            released_by={str(k): int(v) for k, v in snapshot["released_by"].items()},
            priorities=priorities,
            timeouts=sum(int(p["timeouts"]) for p in priorities.values()),
            cancellations=sum(int(p["cancellations"]) for p in priorities.values()),
            isolated_errors=isolated_errors,
            queued=queued,
            padding_efficiency=(
                int(snapshot["real_rows"]) / int(snapshot["padded_rows"])
                if int(snapshot["padded_rows"])
                else 1.0
            ),
            token_budget=int(sizing.get("token_budget", 0)),
            memory_available_bytes=int(telemetry.get("available_bytes", 0)),
            peak_memory_use=max(0.0, peak_used / total_bytes) if total_bytes else 0.0,
            memory_scope="GPU" if on_gpu else "host",
            serving=serving,
            pinned_bytes=int(pool.get("pinned_bytes", 0)),
            pinned_fallbacks=int(pool.get("pinned_fallbacks", 0)),
            pinned_error=str(pool.get("pinned_error", "")),
            compute_histogram=DurationHistogram.from_core(snapshot["compute_time"]),
            queue_wait_histograms={
                int(priority): DurationHistogram.from_core(entry["queue_wait"])
                for priority, entry in sorted(snapshot["priorities"].items())
            },
            timeline=[
                BatchPoint(
                    (int(r[5]) - origin_ns) / 1e9,
                    int(r[1]),
                    int(r[2]),
                    int(r[7]) / 1e6 if int(r[7]) >= 0 else -1.0,
                    max(0, total_bytes - int(r[8])) if int(r[8]) else 0,
                )
                for r in records
            ],
            oom_seconds=[
                (t - origin_ns) / 1e9 for t in (oom_times_ns or []) if records and t >= origin_ns
            ],
            latency_slo_ms=latency_slo_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values (JSON-ready), nested dataclasses included."""
        return asdict(self)
