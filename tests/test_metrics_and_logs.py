"""Stats.to_prometheus() (checked by prometheus_client's own parser), dynbatch.metrics.Collector,
and what the "dynbatch" logger says (and that it says nothing per request)."""

from __future__ import annotations

import gc
import logging
import re
import sys
import threading
import time
from typing import Any

import pytest
import torch

import dynbatch as ds

from .serving_models import RecordingModel, tag, wait_until

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class FakeOOM(RuntimeError):
    pass


def parse(text: str) -> dict[str, Any]:
    """Family name -> family, as Prometheus itself would read the text."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(family: Any, sample_name: str, **labels: str) -> float:
    for sample in family.samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise KeyError(f"{sample_name} {labels} not in {family.samples}")


SUCCESSFUL_CALLS: list[int] = []


def run_with_oom() -> ds.DynamicBatchProcessor:
    """500 samples in batches of 32 that run out of memory above 24, so they run in halves;
    ``SUCCESSFUL_CALLS`` holds the size of every call that did not."""
    SUCCESSFUL_CALLS.clear()

    def model(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > 24:
            raise FakeOOM()
        SUCCESSFUL_CALLS.append(len(batch))
        return batch.sum(1)

    bp = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=32, oom_errors=(FakeOOM,))
    bp.map(model, [torch.randn(8) for _ in range(500)])
    return bp


def test_prometheus_text_parses_and_matches_the_stats() -> None:
    bp = run_with_oom()
    stats = bp.stats()
    families = parse(stats.to_prometheus({"task": 'odd "name"\\'}))

    assert value(families["dynbatch_batches"], "dynbatch_batches_total") == stats.batches
    assert value(families["dynbatch_samples"], "dynbatch_samples_total") == 500
    assert families["dynbatch_batches"].type == "counter"
    sizes = families["dynbatch_batch_size"]
    assert sizes.type == "histogram"
    assert value(sizes, "dynbatch_batch_size_bucket", le="+Inf") == stats.batches
    assert value(sizes, "dynbatch_batch_size_sum") == 500
    at_most_32 = sum(n for size, n in stats.histogram.items() if size <= 32)
    assert value(sizes, "dynbatch_batch_size_bucket", le="32") == at_most_32 > 0
    compute = families["dynbatch_compute_seconds"]
    # Every successful call, the halves of a split batch included.
    assert value(compute, "dynbatch_compute_seconds_count") == len(SUCCESSFUL_CALLS) > stats.batches
    assert value(compute, "dynbatch_compute_seconds_sum") == pytest.approx(
        stats.compute_seconds, rel=1e-6
    )
    buckets = [s.value for s in compute.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    ooms = families["dynbatch_out_of_memory_errors"]
    assert value(ooms, "dynbatch_out_of_memory_errors_total") == stats.ooms >= 1
    ceilings = families["dynbatch_batch_size_ceiling"]
    assert value(ceilings, "dynbatch_batch_size_ceiling", limit="oom") == stats.oom_ceiling
    target = families["dynbatch_target_batch_size"]
    assert value(target, "dynbatch_target_batch_size") == stats.target_batch_size
    total = families["dynbatch_memory_total_bytes"]
    assert value(total, "dynbatch_memory_total_bytes") == stats.memory_total_bytes > 0
    # The label survived escaping.
    assert all(s.labels["task"] == 'odd "name"\\' for f in families.values() for s in f.samples)


def test_prometheus_text_has_per_priority_waits_timeouts_and_cancellations() -> None:
    model = RecordingModel()
    bp = ds.DynamicBatchProcessor(model=model, max_batch_size=8, max_delay_ms=1.0)
    model.hold()
    first = bp.submit(tag(0))
    assert model.entered.wait(10)
    late = bp.submit(tag(1), priority=2, timeout=0.01)
    cancelled = bp.submit(tag(2), priority=2)
    waiting = [bp.submit(tag(i), priority=1) for i in range(3, 10)]
    assert cancelled.cancel()
    time.sleep(0.05)
    model.release()
    for future in [first, *waiting]:
        future.result(10)
    with pytest.raises(ds.RequestTimeout):
        late.result(10)
    families = parse(bp.stats().to_prometheus())
    bp.close()

    waits = families["dynbatch_queue_wait_seconds"]
    assert value(waits, "dynbatch_queue_wait_seconds_count", priority="1") == 7
    assert value(waits, "dynbatch_queue_wait_seconds_count", priority="0") == 1
    timeouts = families["dynbatch_request_timeouts"]
    assert value(timeouts, "dynbatch_request_timeouts_total", priority="2") == 1
    cancels = families["dynbatch_request_cancellations"]
    assert value(cancels, "dynbatch_request_cancellations_total", priority="2") == 1
    released = families["dynbatch_batches_released"]
    assert sum(s.value for s in released.samples) == bp.stats().batches


@pytest.mark.parametrize(
    ("labels", "error", "names"),
    [
        ({"task-name": "a"}, ValueError, "'task-name' is not a Prometheus label name"),
        ({"__reserved": "a"}, ValueError, "'__reserved' is not a Prometheus label name"),
        ({"le": "x"}, ValueError, "'le' is one of dynbatch's own labels"),
        ({"gpu": 0}, TypeError, r"labels\['gpu'\] must be a str, got int"),
        (["task"], TypeError, "labels must be a mapping"),
    ],
)
def test_bad_prometheus_labels_are_named(labels: Any, error: type[Exception], names: str) -> None:
    stats = ds.DynamicBatchProcessor().stats()
    with pytest.raises(error, match=names):
        stats.to_prometheus(labels)


def test_collector_names_what_it_cannot_take() -> None:
    with pytest.raises(TypeError, match="a mapping of task names"):
        ds_metrics().Collector([ds.DynamicBatchProcessor()], registry=None)
    with pytest.raises(TypeError, match="got 'x': int"):
        ds_metrics().Collector({"x": 3}, registry=None)


def test_stats_repr_leaves_out_the_timeline() -> None:
    bp = ds.DynamicBatchProcessor(max_batch_size=4)
    list(bp([torch.zeros(2)] * 4000))
    stats = bp.stats()
    assert len(stats.timeline) == stats.batches > 1000
    assert "BatchPoint" not in repr(stats) and len(repr(stats)) < 5000


def test_collector_reports_each_processor_under_its_task_label() -> None:
    registry = prometheus_client.CollectorRegistry()
    first, second = run_with_oom(), ds.DynamicBatchProcessor(max_batch_size=8)
    list(second([torch.zeros(2)] * 20))
    collector = ds_metrics().Collector({"first": first, "second": second}, registry=registry)

    families = parse(prometheus_client.generate_latest(registry).decode())
    batches = families["dynbatch_batches"]
    assert value(batches, "dynbatch_batches_total", task="first") == first.stats().batches
    assert value(batches, "dynbatch_batches_total", task="second") == second.stats().batches
    sizes = families["dynbatch_batch_size"]
    assert value(sizes, "dynbatch_batch_size_count", task="second") == second.stats().batches

    del second  # held weakly: a processor that is gone is no longer reported
    gc.collect()
    families = parse(prometheus_client.generate_latest(registry).decode())
    assert {s.labels["task"] for s in families["dynbatch_batches"].samples} == {"first"}

    collector.unregister()
    assert prometheus_client.generate_latest(registry) == b""


def test_collector_registers_with_the_default_registry() -> None:
    bp = ds.DynamicBatchProcessor()
    list(bp([torch.zeros(1)] * 3))
    collector = ds_metrics().Collector(bp)
    try:
        text = prometheus_client.generate_latest().decode()
        assert 'dynbatch_samples_total{task="default"} 3.0' in text
    finally:
        collector.unregister()


def test_collector_without_prometheus_client_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r'pip install "dynbatch\[metrics\]"'):
        ds_metrics().Collector(ds.DynamicBatchProcessor())


def ds_metrics() -> Any:
    import dynbatch.metrics

    return dynbatch.metrics


# ----------------------------------------------------------------------------- logging


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dynbatch" and r.levelno == level]


def counted(caplog: pytest.LogCaptureFixture, what: str) -> int:
    """The events that the throttled WARNING lines containing ``what`` report, summed."""
    lines = [m for m in messages(caplog, logging.WARNING) if what in m]
    return sum(int(re.search(r": (\d+)(?: in the last|$| \(latest)", m).group(1)) for m in lines)


def test_sizing_decisions_at_debug_and_oom_recoveries_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dynbatch")
    bp = run_with_oom()
    debug = messages(caplog, logging.DEBUG)
    assert debug and all(m.startswith("target batch size") for m in debug)
    assert len(debug) <= bp.stats().batches  # at most once per batch
    warnings = messages(caplog, logging.WARNING)
    oom = [m for m in warnings if "ran out of memory: retrying in parts of" in m]
    assert len(oom) == bp.stats().ooms


def test_serving_logs_isolated_errors_and_shed_requests_but_nothing_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dynbatch")
    model = RecordingModel(poison={7})
    with ds.DynamicBatchProcessor(model=model, max_batch_size=16, max_delay_ms=1.0) as bp:
        futures = [bp.submit(tag(i)) for i in range(2000)]
        for i, future in enumerate(futures):
            if i == 7:
                with pytest.raises(ValueError, match="poisoned"):
                    future.result(10)
            else:
                future.result(10)
        batches = bp.stats().batches
    records = [r for r in caplog.records if r.name == "dynbatch"]
    assert len(records) <= batches + 2  # sizing changes per batch at most, one error
    warnings = messages(caplog, logging.WARNING)
    assert [m for m in warnings if "failed alone" in m] == [
        "requests failed alone (isolated model errors): 1 "
        "(latest: request 7: ValueError('poisoned tags [7]'))"
    ]


def test_many_failing_requests_give_one_line_per_second_not_one_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dynbatch")
    model = RecordingModel(poison=set(range(0, 400, 2)))  # every other request fails
    with ds.DynamicBatchProcessor(model=model, max_batch_size=16, max_delay_ms=1.0) as bp:
        futures = [bp.submit(tag(i)) for i in range(400)]
        failed = sum(1 for f in futures if f.exception(10) is not None)
    assert failed == 200
    assert wait_until(lambda: counted(caplog, "failed alone") == 200, timeout_s=5)
    assert len([m for m in messages(caplog, logging.WARNING) if "failed alone" in m]) <= 3


def test_shed_requests_are_logged_at_most_once_per_second_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dynbatch")
    model = RecordingModel()
    with ds.DynamicBatchProcessor(model=model, max_batch_size=4, max_queue_size=4) as bp:
        model.hold()
        running = bp.submit(tag(0))
        assert model.entered.wait(10)
        queued = [bp.submit(tag(i)) for i in range(1, 5)]
        refused = 0
        for i in range(5, 500):
            try:
                bp.submit(tag(i))
            except ds.QueueFull:
                refused += 1
        model.release()
        for future in [running, *queued]:
            future.result(10)
    assert refused >= 490  # the queue holds 4 (or 5 while the former moves one aside)
    shed = [m for m in messages(caplog, logging.WARNING) if "queue was full" in m]
    assert shed[0].endswith("(max_queue_size): 1")  # the first at once
    # The rest of the burst, by the timer one interval later: every refusal is counted.
    assert wait_until(lambda: counted(caplog, "queue was full") == refused, timeout_s=5)
    assert len([m for m in messages(caplog, logging.WARNING) if "queue was full" in m]) == 2


def test_timeouts_are_logged_as_shed_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dynbatch")
    model = RecordingModel()
    with ds.DynamicBatchProcessor(model=model, max_batch_size=4, max_delay_ms=1.0) as bp:
        model.hold()
        first = bp.submit(tag(0))
        assert model.entered.wait(10)
        late = [bp.submit(tag(i), timeout=0.001) for i in range(1, 4)]
        time.sleep(0.02)
        model.release()
        first.result(10)
        assert wait_until(lambda: all(f.done() for f in late))
        assert all(isinstance(f.exception(), ds.RequestTimeout) for f in late)
    assert any("timed out before dispatch" in m for m in messages(caplog, logging.WARNING))


def test_closing_without_drain_logs_the_requests_not_run(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dynbatch")
    model = RecordingModel()
    bp = ds.DynamicBatchProcessor(model=model, max_batch_size=2)
    model.hold()
    running = bp.submit(tag(0))
    assert model.entered.wait(10)
    waiting = [bp.submit(tag(i)) for i in range(1, 6)]
    threading.Timer(0.2, model.release).start()  # close() no longer waits for it
    bp.close(drain=False)
    with pytest.raises(ds.ProcessorClosed, match="abandoned"):  # the batch in the model
        running.result(0)
    assert all(isinstance(f.exception(10), ds.ProcessorClosed) for f in waiting)
    assert any(m.startswith("5 requests not run") for m in messages(caplog, logging.WARNING))
