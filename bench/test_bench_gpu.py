"""The device path (dynbatch.transfer), each group with its peer.

On a GPU (skipped without one; ``python -m dynbatch doctor --gpu`` runs them):
- "gpu-h2d-<MiB>": a collated batch in a pinned staging slot copied by the core on its own
  stream, vs ``tensor.to("cuda", non_blocking=True)`` of a pinned tensor (peer "pinned-to").
  Target: >= 90% of the peer's bandwidth (ratio <= 1.11).
- "gpu-overlap": copies of batch k+1 while the model runs batch k (prefetch depth 1) vs the same
  copies and model one after the other (peer "serial"). ``extra_info["efficiency"]`` = total /
  max(all copies, all compute), both measured alone first; target <= 1.1.
- "gpu-gather-<n>": n samples already on the GPU stacked by one gather launch vs
  ``torch.stack`` (peer). Target: ratio <= 1.
- "gpu-e2e": a small image model over a dataset: dynbatch (collate into pinned slots, copy on
  the core's stream, prefetch) vs ``DataLoader(batch_size=32, pin_memory=True)`` +
  ``.to(non_blocking=True)`` (peer "DataLoader"). Target: ratio <= 1/1.2.

On the simulated device (runs everywhere):
- "sim-overlap": the same pipeline logic with a copy delay and a model time chosen equal;
  ``extra_info["efficiency"]`` is measured in simulated time (deterministic); target <= 1.1.
  Peer "serial": prefetch depth 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.dlpack import from_dlpack

from dynbatch import _core
from dynbatch.transfer import SIMULATED_DEVICE, DeviceTarget, SimulatedDeviceConfig, prefetch

_CODES = {torch.float32: (2, 32), torch.uint8: (1, 8)}


def _collate(samples: list[torch.Tensor], pool: _core.StagingPool) -> tuple[list[Any], Any]:
    code, bits = _CODES[samples[0].dtype]
    batch = _core.collate(
        [(list(samples[0].shape), code, bits, 1)],
        [s.data_ptr() for s in samples],
        len(samples),
        pool,
    )
    return [from_dlpack(batch.leaf(0))], batch


# -- simulated device -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["serial", "dynbatch-prefetch"])
def test_sim_overlap(
    impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    count = 40 if bench_size.name == "full" else 12  # (count + 1) / count <= 1.1
    delay_ms = 2.0
    benchmark.group = "sim-overlap"
    depth = 0 if impl == "serial" else 1

    def run() -> float:
        config = SimulatedDeviceConfig(copy_delay_us=(delay_ms * 1e3,) * 2, real_time=True)
        with DeviceTarget(SIMULATED_DEVICE, simulated=config) as target:
            pool = target.staging_pool(3)
            sim = target.simulated_device

            def batches() -> Iterator[tuple[list[Any], Any]]:
                for k in range(count):
                    yield _collate([torch.full((64,), float(k))] * 16, pool)

            for k, (out,) in enumerate(prefetch(target, batches(), depth=depth)):
                assert bool((out == k).all())
                sim.host_work(int(delay_ms * 1e6))  # the model, as long as a copy
            return sim.host_time_ns() / (count * delay_ms * 1e6)

    efficiency = measure(run)
    benchmark.extra_info["efficiency"] = efficiency
    benchmark.extra_info["batches"] = count
    if impl != "serial":
        assert efficiency <= 1.1, efficiency
    else:
        assert efficiency >= 1.9, efficiency


# -- on a GPU -------------------------------------------------------------------------------


def _sync() -> None:
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pinned-to", "dynbatch-staging"])
def test_gpu_h2d(impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any) -> None:
    mib = 64 if bench_size.name == "full" else 4
    benchmark.group = f"gpu-h2d-{mib}MiB"
    samples = [torch.randn(mib * 2**20 // 4 // 32) for _ in range(32)]
    target = DeviceTarget("cuda")
    pool = target.staging_pool(2)
    leaves, batch = _collate(samples, pool)
    pinned = torch.stack(samples).pin_memory()

    def staging() -> torch.Tensor:
        (out,) = target.stage(leaves, batch).wait()
        _sync()
        return out

    def plain() -> torch.Tensor:
        out = pinned.to("cuda", non_blocking=True)
        _sync()
        return out

    out = measure(staging if impl == "dynbatch-staging" else plain)
    assert torch.equal(out.cpu(), pinned)
    benchmark.extra_info["bytes"] = pinned.numel() * 4
    benchmark.extra_info["gb_per_s"] = pinned.numel() * 4 / benchmark.stats.stats.median / 1e9
    target.close()


def _model_step(x: torch.Tensor, weight: torch.Tensor, repeats: int) -> torch.Tensor:
    for _ in range(repeats):
        x = torch.tanh(x @ weight)
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["serial", "dynbatch-prefetch"])
def test_gpu_overlap(
    impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    count = 20 if bench_size.name == "full" else 6
    benchmark.group = "gpu-overlap"
    target = DeviceTarget("cuda")
    pool = target.staging_pool(4)
    samples = [torch.randn(1024, 1024) for _ in range(8)]  # 32 MiB a batch
    weight = torch.randn(1024, 1024, device="cuda") / 32
    staged_batches = [_collate(samples, pool) for _ in range(3)]

    def copies_alone() -> None:
        for k in range(count):
            target.stage(*staged_batches[k % 3]).wait()
        _sync()

    # Size the model to take about as long as a copy, then time each alone.
    import time

    start = time.perf_counter()
    copies_alone()
    copy_s = time.perf_counter() - start
    x = torch.randn(8 * 1024, 1024, device="cuda")
    repeats = 1
    while True:
        _sync()
        start = time.perf_counter()
        _model_step(x, weight, repeats)
        _sync()
        if (time.perf_counter() - start) * count >= copy_s or repeats > 4096:
            break
        repeats *= 2
    start = time.perf_counter()
    for _ in range(count):
        _model_step(x, weight, repeats)
    _sync()
    compute_s = time.perf_counter() - start

    def run() -> None:
        depth = 0 if impl == "serial" else 1
        for (out,) in prefetch(target, (staged_batches[k % 3] for k in range(count)), depth=depth):
            _model_step(out.view(-1, 1024), weight, repeats)
            if depth == 0:
                _sync()  # serial: the model's work ends before the next copy starts
        _sync()

    measure(run)
    total = benchmark.stats.stats.median
    benchmark.extra_info["efficiency"] = total / max(copy_s, compute_s)
    benchmark.extra_info["copy_s"] = copy_s
    benchmark.extra_info["compute_s"] = compute_s
    target.close()


@pytest.mark.gpu
@pytest.mark.parametrize("count", [64, 1024])
@pytest.mark.parametrize("impl", ["torch.stack", "dynbatch-gather"])
def test_gpu_gather(impl: str, count: int, measure: Callable[..., Any], benchmark: Any) -> None:
    benchmark.group = f"gpu-gather-{count}"
    target = DeviceTarget("cuda")
    samples = [torch.randn(3, 64, 64, device="cuda") for _ in range(count)]

    def run() -> torch.Tensor:
        out = target.gather(samples) if impl == "dynbatch-gather" else torch.stack(samples)
        _sync()
        return out

    out = measure(run)
    assert torch.equal(out, torch.stack(samples))
    target.close()


class _Images(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, 64, 64, generator=generator) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["DataLoader", "dynbatch"])
def test_gpu_e2e(impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any) -> None:
    count = 2048 if bench_size.name == "full" else 256
    benchmark.group = "gpu-e2e"
    dataset = _Images(count)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    ).cuda()
    target = DeviceTarget("cuda")
    pool = target.staging_pool(4)

    @torch.no_grad()
    def run() -> float:
        total = torch.zeros((), device="cuda")
        if impl == "DataLoader":
            for batch in DataLoader(dataset, batch_size=32, pin_memory=True):
                total += model(batch.to("cuda", non_blocking=True)).sum()
        else:
            batches = (_collate(dataset.images[i : i + 32], pool) for i in range(0, count, 32))
            for (batch,) in prefetch(target, batches, depth=1):
                total += model(batch).sum()
        return float(total)

    measure(run)
    benchmark.extra_info["samples"] = count
    target.close()
