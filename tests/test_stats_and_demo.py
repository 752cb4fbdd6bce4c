"""stats() reports real measurements; the demo runs and prints its table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

import dynbatch as ds


def test_stats_fields_match_what_happened() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=10, min_batch_size=10)
    for _ in processor([torch.zeros(8)] * 95):
        time.sleep(0.002)
    stats = processor.stats()
    assert stats.batches == 10 and stats.samples == 95
    assert stats.mean_batch_size == 9.5
    assert stats.histogram == {5: 1, 10: 9}
    assert sum(size * count for size, count in stats.histogram.items()) == stats.samples
    assert 0 < stats.throughput < 95 / 0.018  # ten 2 ms pauses bound it
    assert stats.compute_p50_ms >= 2.0 and stats.compute_p99_ms >= stats.compute_p50_ms
    assert stats.latency_p99_ms >= stats.latency_p50_ms > 0
    assert stats.compute_seconds >= 0.018 and stats.collate_seconds > 0
    assert stats.peak_rss_bytes > 0 and stats.min_available_bytes > 0
    assert stats.telemetry_source == "host"
    as_dict = stats.to_dict()
    assert as_dict["samples"] == 95 and as_dict["histogram"] == {5: 1, 10: 9}
    text = str(stats)
    for label in ("batches", "mean batch size", "throughput", "p50 / p99", "in caller"):
        assert label in text
    processor.reset_stats()
    assert processor.stats().samples == 0


def test_demo_prints_measured_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "demo", "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "dynbatch fixed 32" in result.stdout and "dynamic 8.." in result.stdout
    assert "samples/s" in result.stdout and "memory use" in result.stdout
    # The plain loop at 32 and at the size dynbatch settled on, as peers.
    assert "torch.stack loop, 32 " in result.stdout
    assert result.stdout.count("torch.stack loop, ") == 2
    assert "us*n" not in result.stdout or "+ -" not in result.stdout  # no negative cost


def test_memory_use_is_a_share_of_what_the_host_allows() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=16)
    assert sum(len(batch) for batch in processor([torch.zeros(64)] * 100)) == 100
    stats = processor.stats()
    processor.close()
    assert stats.memory_scope == "host"
    assert stats.peak_memory_use == pytest.approx(stats.peak_rss_bytes / stats.memory_total_bytes)
    assert 0 < stats.peak_memory_use < 1
    assert f"{stats.peak_memory_use:.1%} of host memory" in str(stats)


def test_iterator_stats_show_no_serving_rows_and_serving_stats_do() -> None:
    with ds.DynamicBatchProcessor(max_batch_size=8) as processor:
        for _ in processor([torch.zeros(4)] * 40):
            pass
        text = str(processor.stats())
    assert not processor.stats().serving
    for row in ("batch latency", "released by", "timeouts", "priority 0"):
        assert row not in text
    with ds.DynamicBatchProcessor(max_batch_size=8, model=lambda batch: batch) as server:
        assert all(
            f.result(timeout=10).shape == (4,) for f in server.submit_many([torch.zeros(4)] * 20)
        )
        stats = server.stats()
    assert stats.serving
    for row in ("batch latency", "released by", "timeouts", "priority 0"):
        assert row in str(stats)


def test_a_learned_line_with_a_negative_part_is_not_shown_as_a_cost() -> None:
    with ds.DynamicBatchProcessor(max_batch_size=8) as processor:
        list(processor([torch.zeros(4)] * 8))
        stats = processor.stats()
    negative = dataclasses.replace(stats, latency_intercept_ms=0.15, latency_slope_ms=-0.000453)
    assert "-0.453" not in str(negative) and "not learned yet" in str(negative)
    positive = dataclasses.replace(stats, latency_intercept_ms=0.15, latency_slope_ms=0.002)
    assert "0.1500 ms + 2.000 us*n" in str(positive)


def test_unknown_command_prints_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "nope"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "usage" in result.stderr


def test_stats_after_close_and_closed_telemetry_raises() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8)
    assert sum(len(batch) for batch in processor([torch.zeros(2)] * 20)) == 20
    processor.close()
    assert processor.stats().samples == 20
    telemetry = ds._core.Telemetry.host()
    telemetry.close()
    with pytest.raises(RuntimeError, match="closed"):
        telemetry.latest()
