"""The first sizing rule: size follows the caller's throughput and host memory headroom."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import dynbatch as ds
from dynbatch import _core

ROOT = Path(__file__).resolve().parents[1]


def drive(
    policy: _core.SizingPolicy, seconds_per_batch: Callable[[int], float], batches: int
) -> list[int]:
    """Drives a policy with a made-up caller, with the one-batch lag of the real iterator."""
    sizes: list[int] = []
    formed = policy.next_batch_size(0, 0, 0)
    for _ in range(batches):
        current = formed
        formed = policy.next_batch_size(0, 0, 0)
        cost_ns = int(seconds_per_batch(current) * 1e9)
        policy.on_feedback(_core.BatchFeedback(current, compute_ns=cost_ns))
        sizes.append(current)
    return sizes


def test_explores_growing_4x_then_stops_at_the_knee() -> None:
    policy = _core.SizingController(1, 4096, knee_tolerance=0.05)
    # a = 2 ms, b = 10 us: knee = 0.95 * 2e6 / (0.05 * 1e4) = 3800
    sizes = drive(policy, lambda n: 0.002 + 10e-6 * n, 40)
    # Each size twice (the iterator forms one ahead), the first five times: the first batch's
    # time is not learned (it pays for the run's start), and the first size, which pins the
    # intercept, is learned three times (a median outvotes one outlier).
    assert sizes[:8] == [1, 1, 1, 1, 1, 4, 4, 16]
    state = policy.state()
    assert not state["exploring"]
    assert state["knee"] == 3800
    assert sizes[-1] == 3800
    assert abs(state["latency_intercept_ns"] - 2e6) < 1e3
    assert abs(state["latency_slope_ns"] - 1e4) < 1


def test_a_bigger_size_measured_slower_caps_the_knee() -> None:
    # 2 ms + 10 us a sample (the line's knee: 3800), but past 1024 samples each costs 30% more
    # (a CPU's caches): 1024 measured best and 4096 12% slower, so the knee stays at 1024
    # (the line alone, which only flattens, settled at 3364), and its neighbours (64 and 2048)
    # are measured again now and then.
    def seconds(n: int) -> float:
        return 0.002 + 10e-6 * n * (1.3 if n > 1024 else 1.0)

    policy = _core.SizingController(1, 4096)
    sizes = drive(policy, seconds, 60)
    assert policy.state()["knee"] == 1024
    assert set(sizes[20:]) == {64, 1024, 2048} and sizes[20:].count(1024) >= 35
    # Where the larger sizes pay, nothing caps: the line's knee.
    steady = _core.SizingController(1, 4096)
    assert drive(steady, lambda n: 0.002 + 10e-6 * n, 60)[-1] == 3800


def test_no_fixed_cost_means_no_reason_to_batch() -> None:
    policy = _core.SizingController(2, 512)
    sizes = drive(policy, lambda n: 1e-5 * n, 30)
    assert sizes[-1] == 2


def test_never_leaves_bounds_under_noise() -> None:
    rng = random.Random(7)
    policy = _core.SizingController(8, 64)
    sizes = drive(policy, lambda n: rng.uniform(1e-4, 5e-3) * (1 + n / 64), 500)
    assert min(sizes) >= 8 and max(sizes) <= 64
    assert len(set(sizes)) > 1


def test_staged_memory_caps_the_batch_before_a_memory_model() -> None:
    policy = _core.SizingController(4, 512, staged_memory_fraction=0.25)
    drive(policy, lambda n: 0.001 + 1e-6 * n, 60)
    assert policy.next_batch_size(0, 1000, 10**9) == 512
    assert policy.next_batch_size(0, 1000, 40_000) == 10  # 25% of 40 kB / 1 kB
    assert policy.next_batch_size(0, 1000, 100) == 4  # never below the minimum
    assert policy.state()["memory_ceiling"] == 4


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="min_batch_size"):
        _core.SizingController(0, 8)
    with pytest.raises(ValueError, match="knee_tolerance"):
        _core.SizingController(1, 8, knee_tolerance=1.5)


def test_low_scripted_memory_shrinks_batches_in_the_iterator() -> None:
    sample_bytes = 256 * 4
    telemetry = _core.Telemetry.scripted(10**9, 12 * sample_bytes * 4)  # 12 samples fit at 25%
    processor = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=2, telemetry=telemetry)
    data = [torch.randn(256) for _ in range(400)]
    sizes = []
    for batch in processor(data):
        sizes.append(len(batch))
        time.sleep(0.0005 * len(batch) ** 0.5)  # bigger would be better if memory allowed
    assert max(sizes) == 12
    assert processor.stats().memory_ceiling == 12
    telemetry.set_scripted(10**9, 10**9)
    sizes = [len(batch) for batch in processor(data)]
    assert max(sizes) > 12


def test_sizes_vary_on_the_design_example() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    sizes = [
        int(line.rsplit(" ", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith("Processed batch")
    ]
    assert sum(sizes) == 100
    assert len(set(sizes)) > 1, f"batch size never moved: {sizes}"
    assert all(8 <= size <= 64 for size in sizes[:-1])
    assert "mean batch size" in result.stdout and "throughput" in result.stdout


@pytest.mark.parametrize("bounds", [(1, 1), (5, 5), (3, 17)])
def test_fixed_and_narrow_bounds(bounds: tuple[int, int]) -> None:
    low, high = bounds
    processor = ds.DynamicBatchProcessor(max_batch_size=high, min_batch_size=low)
    sizes = [len(batch) for batch in processor([torch.zeros(1)] * 101)]
    assert sum(sizes) == 101
    assert all(low <= size <= high for size in sizes[:-1])


def _former(max_delay_ms: float | None, size: int) -> tuple[_core.BatchFormer, list[torch.Tensor]]:
    samples = [torch.full((4,), float(i)) for i in range(3)]
    former = _core.BatchFormer(
        [([4], 2, 32, 1)],
        64,
        1,
        _core.StagingPool(3),
        _core.SizingController(size, size),
        _core.Telemetry.scripted(10**9, 10**9),
        _core.StatsRecorder(),
        max_delay_ms=max_delay_ms,
    )
    assert former.push(0, 3, [s.data_ptr() for s in samples]) == 3
    return former, samples


def test_a_short_queue_is_dispatched_after_max_delay() -> None:
    former, samples = _former(max_delay_ms=30.0, size=32)
    started = time.perf_counter()
    batch = former.next_batch(timeout_s=5.0)
    waited = time.perf_counter() - started
    assert batch is not None and batch.size == 3 and batch.ids == [0, 1, 2]
    assert waited >= 0.025  # held for the delay, hoping for more
    assert torch.equal(torch.from_dlpack(batch.leaf(0)), torch.stack(samples))
    former.close()


def test_without_max_delay_a_short_queue_waits_for_the_target() -> None:
    former, _ = _former(max_delay_ms=None, size=32)
    with pytest.raises(TimeoutError, match="no batch within the timeout"):
        former.next_batch(timeout_s=0.2)
    former.close_input()  # the end of input closes the batch
    batch = former.next_batch(timeout_s=5.0)
    assert batch is not None and batch.size == 3
    former.close()


def test_a_zero_max_delay_dispatches_a_short_queue_at_once() -> None:
    former, _ = _former(max_delay_ms=0.0, size=32)
    batch = former.next_batch(timeout_s=5.0)
    assert batch is not None and batch.size == 3 and batch.reason == "max_delay"
    former.close()


def test_a_long_queue_fills_the_target_at_once() -> None:
    samples = [torch.full((4,), float(i)) for i in range(40)]
    former = _core.BatchFormer(
        [([4], 2, 32, 1)],
        64,
        1,
        _core.StagingPool(3),
        _core.SizingController(16, 16),
        _core.Telemetry.scripted(10**9, 10**9),
        _core.StatsRecorder(),
        max_delay_ms=10_000.0,
    )
    assert former.push(0, 40, [s.data_ptr() for s in samples]) == 40
    started = time.perf_counter()
    sizes = [former.next_batch(timeout_s=5.0).size for _ in range(2)]  # type: ignore[union-attr]
    assert sizes == [16, 16] and time.perf_counter() - started < 5.0
    former.close()


def test_next_plan_reports_pushes_and_forms_in_one_call() -> None:
    """The stacking consumer's per-batch call: feedback in, samples in, the next batch out."""
    stats = _core.StatsRecorder()
    policy = _core.SizingController(4, 4)
    former = _core.BatchFormer(
        [([4], 2, 32, 1)],
        16,
        1,
        _core.StagingPool(1),
        policy,
        _core.Telemetry.scripted(10**9, 10**9),
        stats,
        collate=False,
        own_thread=False,
    )
    accepted, plan = former.next_plan(0, 0, 0, 0, 0, 0, 0, 6, False)  # no feedback yet
    assert accepted == 6 and plan is not None
    first_id, size, sequence, target = plan
    assert (first_id, size, target) == (0, 4, 4)
    assert policy.state()["observations"] == 0
    # The first batch's feedback and the end of input: the last 2 come as a drained batch.
    accepted, plan = former.next_plan(sequence, 4, 2_000_000, 1_000, 0, 0, 6, 0, True)
    assert accepted == 0 and plan is not None and plan[:2] == (4, 2)
    assert policy.state()["observations"] == 0  # the run's first batch: its time not learned
    assert former.next_plan(plan[2], 2, 1_000_000, 1_000, 0, 0, 6, 0, False) == (0, None)
    assert policy.state()["observations"] == 1
    assert stats.snapshot()["batches"] == 2
    # Refused (the input is closed): nothing formed, the caller is told how many went in.
    assert former.next_plan(0, 0, 0, 0, 0, 0, 6, 3, False) == (0, None)
    former.close()


def test_a_noisy_fit_does_not_undo_measured_gains() -> None:
    # Per-sample cost falls only at large sizes (as a CPU GEMM's does): the knee of the
    # least-squares line through these points lies below the size that measured fastest.
    per_sample_us = {1: 50, 2: 50, 4: 50, 8: 50, 16: 50, 32: 50, 64: 50, 128: 50, 256: 35}
    policy = _core.SizingController(1, 256)
    for size, cost_us in per_sample_us.items():
        for _ in range(2):
            policy.on_feedback(_core.BatchFeedback(size, compute_ns=cost_us * size * 1000))
    state = policy.state()
    a, b = state["latency_intercept_ns"], state["latency_slope_ns"]
    assert 0.95 * max(a, 0.0) / (0.05 * b) < 200  # what the line alone would choose
    assert state["knee"] == 256  # the measurements say more is worth it
    assert policy.next_batch_size(0, 0, 0) == 256
