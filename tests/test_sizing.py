"""The first sizing rule: size follows the caller's throughput and host memory headroom."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynbatch as ds
from dynbatch import _core

ROOT = Path(__file__).resolve().parents[1]


def simulate(policy: _core.SizingPolicy, seconds_per_batch: object, batches: int) -> list[int]:
    """Drives a policy with a made-up caller, with the one-batch lag of the real iterator."""
    sizes: list[int] = []
    formed = policy.next_batch_size(0, 0, 0)
    for _ in range(batches):
        current = formed
        formed = policy.next_batch_size(0, 0, 0)
        cost_ns = int(seconds_per_batch(current) * 1e9)  # type: ignore[operator]
        policy.on_feedback(current, cost_ns, 0)
        sizes.append(current)
    return sizes


def test_climbs_toward_max_when_bigger_is_always_better() -> None:
    policy = _core.ThroughputClimb(8, 512)
    sizes = simulate(policy, lambda n: 0.002 + 10e-6 * n, 60)
    assert sizes[0] == 8 and sizes[-1] == 512
    assert policy.state()["converged"]


def test_settles_near_the_best_size_of_a_curved_cost() -> None:
    # Per-sample cost is lowest at n = 96: c(n) = a/n + b + k*n.
    def batch_time(n: int) -> float:
        return 0.00092 + 1e-5 * n + 1e-7 * n * n

    policy = _core.ThroughputClimb(1, 1024)
    sizes = simulate(policy, batch_time, 120)
    assert 96 / 1.25 <= sizes[-1] <= 96 * 1.25
    assert all(1 <= size <= 1024 for size in sizes)


def test_never_leaves_bounds_under_noise() -> None:
    rng = random.Random(7)
    policy = _core.ThroughputClimb(8, 64)
    sizes = simulate(policy, lambda n: rng.uniform(1e-4, 5e-3) * (1 + n / 64), 500)
    assert min(sizes) >= 8 and max(sizes) <= 64
    assert len(set(sizes)) > 1


def test_memory_ceiling_caps_the_batch() -> None:
    policy = _core.ThroughputClimb(4, 512, 0.25)
    simulate(policy, lambda n: 0.001 + 1e-5 * n, 60)  # grows to 512
    assert policy.next_batch_size(0, 1000, 10**9) == 512
    assert policy.next_batch_size(0, 1000, 40_000) == 10  # 25% of 40 kB / 1 kB
    assert policy.next_batch_size(0, 1000, 100) == 4  # never below the minimum
    assert policy.state()["memory_ceiling"] == 4


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
