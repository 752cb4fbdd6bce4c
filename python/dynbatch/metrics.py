"""Prometheus metrics: ``Stats.to_prometheus()`` text, and a ``Collector`` for prometheus_client.

Both render the same families from one ``Stats`` (``families``), so the text a processor serves
itself and what a ``prometheus_client`` registry scrapes never differ. Every family is named
``dynbatch_*``; counters end in ``_total``; durations are in seconds, memory in bytes.

    from prometheus_client import start_http_server
    from dynbatch.metrics import Collector
    Collector({"classifier": processor})   # registers with prometheus_client's default registry
    start_http_server(9100)
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .stats_data import DurationHistogram, StatsRecord

__all__ = ["Collector"]  # Stats.to_prometheus() is the other way in

# Batch sizes are counted exactly; Prometheus buckets them at powers of two up to 2^16.
_BATCH_SIZE_EDGES = tuple(2**k for k in range(17))
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OWN_LABELS = ("le", "priority", "reason", "limit")


class _HasStats(Protocol):
    """What a Collector reads: a processor, duck-typed so this module stays below it."""

    def stats(self) -> StatsRecord: ...


@dataclass(frozen=True)
class HistogramValue:
    upper_edges: tuple[float, ...]
    cumulative_counts: tuple[int, ...]
    count: int
    sum: float


Sample = tuple[dict[str, str], "float | HistogramValue"]


@dataclass
class Family:
    """One metric family: its samples are (labels, value) pairs."""

    name: str  # without the _total of counters
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    samples: list[Sample] = field(default_factory=list)


def _batch_size_histogram(histogram: Mapping[int, int]) -> HistogramValue:
    counts = [sum(n for size, n in histogram.items() if size <= edge) for edge in _BATCH_SIZE_EDGES]
    return HistogramValue(
        tuple(float(edge) for edge in _BATCH_SIZE_EDGES),
        tuple(counts),
        sum(histogram.values()),
        float(sum(size * n for size, n in histogram.items())),
    )


def _durations(histogram: DurationHistogram) -> HistogramValue:
    return HistogramValue(
        histogram.upper_edges_seconds,
        histogram.cumulative_counts,
        histogram.count,
        histogram.sum_seconds,
    )


def families(stats: StatsRecord, labels: Mapping[str, str]) -> list[Family]:
    """The metric families of one processor's stats, each sample carrying ``labels``."""
    base = dict(labels)

    def one(name: str, kind: Literal["counter", "gauge"], help: str, value: float) -> Family:
        return Family(name, kind, help, [(base, float(value))])

    def per(key: str, values: Mapping[Any, float]) -> list[Sample]:
        return [({**base, key: str(k)}, float(v)) for k, v in values.items()]

    priorities = stats.priorities
    result = [
        one("dynbatch_batches", "counter", "Batches delivered.", stats.batches),
        one("dynbatch_samples", "counter", "Samples delivered in batches.", stats.samples),
        Family(
            "dynbatch_batch_size",
            "histogram",
            "Samples per batch.",
            [(base, _batch_size_histogram(stats.histogram))],
        ),
        Family(
            "dynbatch_compute_seconds",
            "histogram",
            "The caller's (or model's) time per call: a batch, or each part of a batch split "
            "after an out-of-memory error or to isolate a failing request.",
            []
            if stats.compute_histogram is None
            else [(base, _durations(stats.compute_histogram))],
        ),
        Family(
            "dynbatch_queue_wait_seconds",
            "histogram",
            "Serving: a request's wait from submit to dispatch, per request priority.",
            [
                ({**base, "priority": str(p)}, _durations(h))
                for p, h in stats.queue_wait_histograms.items()
            ],
        ),
        Family(
            "dynbatch_batches_released",
            "counter",
            "Serving: why batches left the queue (full, max_delay, deadline, drain).",
            per("reason", stats.released_by),
        ),
        one("dynbatch_out_of_memory_errors", "counter", "Out-of-memory errors.", stats.ooms),
        one(
            "dynbatch_split_batches",
            "counter",
            "Batches delivered in parts after an out-of-memory error.",
            stats.split_batches,
        ),
        Family(
            "dynbatch_request_timeouts",
            "counter",
            "Serving: requests that timed out before dispatch, per priority.",
            per("priority", {p: e["timeouts"] for p, e in priorities.items()}),
        ),
        Family(
            "dynbatch_request_cancellations",
            "counter",
            "Serving: requests cancelled before dispatch, per priority.",
            per("priority", {p: e["cancellations"] for p, e in priorities.items()}),
        ),
        Family(
            "dynbatch_request_errors",
            "counter",
            "Serving: requests that ended with their own (isolated) model error, per priority.",
            per("priority", {p: e["isolated_errors"] for p, e in priorities.items()}),
        ),
        one("dynbatch_queued_requests", "gauge", "Serving: requests waiting now.", stats.queued),
        one(
            "dynbatch_target_batch_size",
            "gauge",
            "The batch size the sizing aims at now.",
            stats.target_batch_size,
        ),
        Family(
            "dynbatch_batch_size_ceiling",
            "gauge",
            "The limits on the target: the throughput knee and the memory, OOM and SLO ceilings.",
            per(
                "limit",
                {
                    "knee": stats.knee,
                    "memory": stats.memory_ceiling,
                    "oom": stats.oom_ceiling,
                    "slo": stats.slo_ceiling,
                },
            ),
        ),
        one(
            "dynbatch_memory_available_bytes",
            "gauge",
            f"Memory available now ({stats.telemetry_source}).",
            stats.memory_available_bytes,
        ),
        one(
            "dynbatch_memory_available_min_bytes",
            "gauge",
            "The lowest available memory seen.",
            stats.min_available_bytes,
        ),
        one("dynbatch_memory_total_bytes", "gauge", "Total memory.", stats.memory_total_bytes),
        one(
            "dynbatch_process_peak_rss_bytes",
            "gauge",
            "The process's peak resident memory.",
            stats.peak_rss_bytes,
        ),
        one("dynbatch_staging_bytes", "gauge", "Pooled staging buffers.", stats.staging_bytes),
        one(
            "dynbatch_throughput_samples_per_second",
            "gauge",
            "Samples per second of active time.",
            stats.throughput,
        ),
        one(
            "dynbatch_padding_efficiency",
            "gauge",
            "Real rows / rows after padding (1: no padding).",
            stats.padding_efficiency,
        ),
    ]
    return [family for family in result if family.samples]


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _lines(family: Family) -> Iterator[str]:
    name = family.name + ("_total" if family.kind == "counter" else "")
    help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {family.kind}"
    for labels, value in family.samples:
        if isinstance(value, HistogramValue):
            for edge, below in zip(value.upper_edges, value.cumulative_counts, strict=True):
                yield f"{name}_bucket{_labels({**labels, 'le': _number(edge)})} {below}"
            yield f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {value.count}"
            yield f"{name}_sum{_labels(labels)} {_number(value.sum)}"
            yield f"{name}_count{_labels(labels)} {value.count}"
        else:
            yield f"{name}{_labels(labels)} {_number(value)}"


def check_labels(labels: Mapping[str, str], argument: str = "labels") -> dict[str, str]:
    """``labels`` as a dict, or an error naming the label that Prometheus would reject or that
    would collide with one of dynbatch's own."""
    if not isinstance(labels, Mapping):
        raise TypeError(f"{argument} must be a mapping of str to str, got {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(
                f"{argument}: {key!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
            )
        if key in _OWN_LABELS:
            raise ValueError(f"{argument}: {key!r} is one of dynbatch's own labels {_OWN_LABELS}")
        if not isinstance(value, str):
            raise TypeError(f"{argument}[{key!r}] must be a str, got {type(value).__name__}")
    return dict(labels)


def render_prometheus(stats: StatsRecord, labels: Mapping[str, str]) -> str:
    """The text exposition format (0.0.4) of ``families(stats, labels)``."""
    labels = check_labels(labels)
    return "\n".join(line for family in families(stats, labels) for line in _lines(family)) + "\n"


class Collector:
    """A ``prometheus_client`` collector for one or more processors, labelled ``task``.

    ``Collector(processor)`` (task ``"default"``) or ``Collector({"name": processor, ...})``
    registers itself with ``registry`` (prometheus_client's default one unless given; None:
    not registered) and reads each processor's ``stats()`` at every scrape. It holds the
    processors weakly: a processor that is gone stops being reported. One collector per
    registry: a second with the same metric names is refused by prometheus_client.
    """

    def __init__(
        self,
        processors: _HasStats | Mapping[str, _HasStats],
        *,
        registry: Any = "default",
    ) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise ImportError(
                "dynbatch.metrics.Collector needs prometheus_client: "
                'pip install "dynbatch[metrics]" (or pip install prometheus-client)'
            ) from None
        named = processors if isinstance(processors, Mapping) else {"default": processors}
        if not named:
            raise ValueError("Collector needs at least one processor")
        for task, processor in named.items():
            if not isinstance(task, str) or not callable(getattr(processor, "stats", None)):
                raise TypeError(
                    "Collector takes a DynamicBatchProcessor or a mapping of task names (str) "
                    f"to them, got {task!r}: {type(processor).__name__}"
                )
        self._processors = {task: weakref.ref(p) for task, p in named.items()}
        self._registry = prometheus_client.REGISTRY if registry == "default" else registry
        if self._registry is not None:
            self._registry.register(self)

    def unregister(self) -> None:
        """Stops reporting (removes this collector from its registry)."""
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None

    def collect(self) -> Iterator[Any]:
        """The metric families of every live processor (prometheus_client calls this at each
        scrape)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        merged: dict[str, Family] = {}
        for task, reference in self._processors.items():
            processor = reference()
            if processor is None:
                continue
            for family in families(processor.stats(), {"task": task}):
                merged.setdefault(family.name, Family(family.name, family.kind, family.help))
                merged[family.name].samples.extend(family.samples)
        for family in merged.values():
            keys = list(family.samples[0][0])
            metric: Any
            if family.kind == "histogram":
                metric = HistogramMetricFamily(family.name, family.help, labels=keys)
                for labels, value in family.samples:
                    assert isinstance(value, HistogramValue)
                    buckets = [
                        (_number(edge), float(below))
                        for edge, below in zip(
                            value.upper_edges, value.cumulative_counts, strict=True
                        )
                    ]
                    buckets.append(("+Inf", float(value.count)))
                    metric.add_metric(list(labels.values()), buckets, value.sum)
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(family.name, family.help, labels=keys)
                for labels, value in family.samples:
                    assert isinstance(value, float)
                    metric.add_metric(list(labels.values()), value)
            yield metric
