"""The sizing brain on a simulated device (deterministic, CPU): convergence, memory, OOM,
capacity changes, the latency SLO and timing noise."""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import pytest
import torch

import dynbatch as ds

from .simulated_device import SimulatedDevice, SimulatedOOM, tagged_samples

GIB = 2**30
MIB = 2**20


def processor_on(device: SimulatedDevice, **options: object) -> ds.DynamicBatchProcessor:
    return ds.DynamicBatchProcessor(
        max_batch_size=int(options.pop("max_batch_size", 4096)),  # type: ignore[call-overload]
        min_batch_size=int(options.pop("min_batch_size", 1)),  # type: ignore[call-overload]
        oom_errors=(SimulatedOOM,),
        telemetry=device.telemetry,
        clock=device.clock,
        memory_monitor=device,
        **options,  # type: ignore[arg-type]
    )


def assert_every_sample_once(
    device: SimulatedDevice, results: list[torch.Tensor], count: int
) -> None:
    assert [int(r) for r in results] == [10 * i for i in range(count)]
    ran = sorted(tag for run in device.runs for tag in run)
    assert ran == list(range(count)), "a sample was lost or ran twice"


def test_converges_near_the_largest_size_that_fits() -> None:
    device = SimulatedDevice(a_s=0.05, b_s=1e-4, m0=1 * GIB, m1=20 * MIB, capacity=10 * GIB)
    processor = processor_on(device)
    results = processor.map(device.model, tagged_samples(12000))
    assert_every_sample_once(device, results, 12000)
    sizes = [len(run) for run in device.runs]
    best = device.best_size()  # 460
    assert not device.ooms
    converged = [index for index, size in enumerate(sizes) if size >= 0.9 * best]
    assert converged and converged[0] <= 20, sizes[:30]
    assert all(0.9 * best <= size <= best for size in sizes[converged[0] : -1])
    stats = processor.stats()
    assert abs(stats.memory_slope_bytes - 20 * MIB) < 1
    assert abs(stats.memory_intercept_bytes - GIB) < 1e3


def test_after_one_oom_the_ceiling_holds() -> None:
    # No memory feedback: the controller cannot predict and finds the limit the hard way.
    device = SimulatedDevice(
        a_s=0.05, b_s=1e-4, m0=GIB, m1=20 * MIB, capacity=6 * GIB, report_memory=False
    )
    processor = processor_on(device, max_batch_size=1024)
    results = processor.map(device.model, tagged_samples(20000))
    assert_every_sample_once(device, results, 20000)
    failed = device.ooms[0]
    sizes = [len(run) for run in device.runs]
    after_first = sizes[sizes.index(max(sizes)) :]
    # Never the failing size again; later probes above what works are rare (backed off).
    assert max(sizes) < failed and all(size < failed for size in device.ooms[1:])
    assert len(device.ooms) <= 3, device.ooms
    best = device.best_size()  # 256
    assert sum(size == best for size in after_first) > 0.8 * len(after_first)
    stats = processor.stats()
    assert stats.ooms == len(device.ooms) and stats.split_batches >= 1
    assert best <= stats.oom_ceiling < failed


def test_capacity_drop_mid_run_is_followed_without_oom() -> None:
    device = SimulatedDevice(a_s=0.05, b_s=1e-4, m0=GIB, m1=20 * MIB, capacity=10 * GIB)
    processor = processor_on(device)
    samples = tagged_samples(20000)
    drop_at = 6000

    def stream() -> Iterator[torch.Tensor]:
        for index, sample in enumerate(samples):
            if index == drop_at:
                device.take_memory(4 * GIB)  # another process arrives
            yield sample

    results = processor.map(device.model, stream())
    assert_every_sample_once(device, results, len(samples))
    assert not device.ooms
    after = device.best_size()  # 256
    sizes_after = [len(run) for run in device.runs if run[0] >= drop_at + 2 * 4096]
    assert sizes_after and all(0.85 * after <= size <= after for size in sizes_after[:-1])


def test_latency_slo_is_respected() -> None:
    # 5 ms + 0.2 ms per sample; an SLO of 25 ms allows at most 100 samples.
    device = SimulatedDevice(a_s=0.005, b_s=2e-4, m0=0, m1=MIB, capacity=100 * GIB)
    processor = processor_on(device, latency_slo_ms=25.0)
    results = processor.map(device.model, tagged_samples(5000))
    assert_every_sample_once(device, results, 5000)
    sizes = [len(run) for run in device.runs]
    explored = sizes.index(max(sizes[:12]))  # the exploration ends within a few batches
    assert all(size <= 100 for size in sizes[explored + 2 :])
    assert sizes[-2] >= 90
    assert processor.stats().slo_ceiling == 100


def test_memory_taken_while_a_batch_runs_costs_one_oom_at_most() -> None:
    # Without warning, another process takes so much that the batch in flight fails: its
    # halves and the batch formed ahead are cut to what fits now, not merely halved.
    device = SimulatedDevice(a_s=0.05, b_s=1e-4, m0=GIB, m1=20 * MIB, capacity=10 * GIB)
    processor = processor_on(device)
    samples = tagged_samples(12000)
    model_calls = 0

    def model(batch: torch.Tensor) -> torch.Tensor:
        nonlocal model_calls
        model_calls += 1
        if model_calls == 10:  # settled by then (64, 64, 256, 256, then 435)
            device.take_memory(5 * GIB)
        return device.model(batch)

    results = processor.map(model, samples)
    assert_every_sample_once(device, results, len(samples))
    assert len(device.ooms) == 1, device.ooms
    after = device.best_size()  # 204
    tail = [len(run) for run in device.runs[-20:-1]]
    assert all(0.85 * after <= size <= after for size in tail), tail


@pytest.mark.parametrize("seed", range(8))
def test_under_five_percent_noise_the_size_settles_near_the_knee(seed: int) -> None:
    # 0.5 ms + 0.1 ms per sample: the knee is 95; memory plenty. Each call's time is off by 5%
    # (one standard deviation), as on a busy host.
    device = SimulatedDevice(
        a_s=5e-4, b_s=1e-4, m0=0, m1=MIB, capacity=100 * GIB, noise=0.05, seed=seed
    )
    processor = processor_on(device, max_batch_size=1024)
    results = processor.map(device.model, tagged_samples(16000))
    assert_every_sample_once(device, results, 16000)
    sizes = [len(run) for run in device.runs[:-1]]  # the last one may be partial
    settled = statistics.median(sizes[-len(sizes) // 4 :])
    knee = device.knee()
    assert knee == 95
    assert knee / 1.3 <= settled <= 1.3 * knee, (settled, sizes[-40:])
