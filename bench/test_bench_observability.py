"""What watching costs (issue 6): groups "observe-progress-<n>x<features>" and "observe-scrape".

- progress: a pass over samples with ``progress=True`` (a tqdm bar, updated once per batch)
  against the same pass without it (the peer, "no-bar").
- scrape: ``stats().to_prometheus()`` and a prometheus_client scrape through
  ``dynbatch.metrics.Collector`` against ``stats()`` alone (the peer), on a processor that has
  delivered a full stats window of batches (4096 records).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from typing import Any

import pytest
import torch

import dynbatch as ds

pytest.importorskip("tqdm")
prometheus_client = pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def busy_processor() -> Iterator[ds.DynamicBatchProcessor]:
    """A processor with a full window of batch records and a serving history."""
    with ds.DynamicBatchProcessor(max_batch_size=8, model=lambda batch: batch) as bp:
        list(bp([torch.zeros(4)] * 40_000))
        for future in bp.submit_many([torch.zeros(4)] * 2000):
            future.result(10)
        yield bp


@pytest.mark.parametrize("impl", ["no-bar", "progress=True"])
def test_progress(impl: str, bench_size: Any, benchmark: Any, measure: Callable[..., Any]) -> None:
    count, features = bench_size.iterate_samples, bench_size.flat_features
    benchmark.group = f"observe-progress-{count}x{features}"
    data = [torch.randn(features) for _ in range(count)]
    model = torch.nn.Linear(features, 10).eval()
    progress = impl == "progress=True"
    bp = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=8)

    def run() -> int:
        rows = 0
        with torch.no_grad(), redirect_stderr(io.StringIO()):
            for batch in bp(data, progress=progress):
                rows += model(batch).shape[0]
        return rows

    assert measure(run) == count
    bp.close()


@pytest.mark.parametrize("impl", ["stats()", "to_prometheus()", "Collector scrape"])
def test_scrape(
    impl: str,
    busy_processor: ds.DynamicBatchProcessor,
    benchmark: Any,
    measure: Callable[..., Any],
) -> None:
    benchmark.group = "observe-scrape"
    registry = prometheus_client.CollectorRegistry()
    ds_metrics = pytest.importorskip("dynbatch.metrics")
    ds_metrics.Collector({"bench": busy_processor}, registry=registry)
    run: Callable[[], Any] = {
        "stats()": busy_processor.stats,
        "to_prometheus()": lambda: busy_processor.stats().to_prometheus({"task": "bench"}),
        "Collector scrape": lambda: prometheus_client.generate_latest(registry),
    }[impl]
    assert measure(run)
