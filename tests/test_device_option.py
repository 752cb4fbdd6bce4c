"""device=: batches arrive on the device through the core's copy engine, for the iterator,
map, serving and padding. Proven here on the core's simulated device ("dynbatch-sim"), where
every copy is checked against its source being reused early; the CUDA mapping of the same
calls is tested by the GPU-marked tests (python -m dynbatch doctor --gpu)."""

from __future__ import annotations

import pytest
import torch

import dynbatch as ds
from dynbatch import _core

SIM = "dynbatch-sim"


def _samples(count: int, width: int = 5000) -> list[torch.Tensor]:
    return [torch.full((width,), float(i)) for i in range(count)]


def _transfers(processor: ds.DynamicBatchProcessor) -> int:
    target = processor._engine.target
    assert target is not None
    stats = target.stats()
    assert stats["failures"] == 0
    return int(stats["transfers"])


def test_iterator_batches_arrive_through_the_copy_engine_one_ahead() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8, device=SIM)
    samples = _samples(40)
    seen = []
    for number, batch in enumerate(processor(samples)):
        # The next batch's copy is enqueued before this one reaches the caller.
        assert _transfers(processor) == min(number + 2, 5)
        seen.append(batch.clone())
    assert torch.equal(torch.cat(seen), torch.stack(samples))
    assert processor._engine.pool.stats()["pinned_fallbacks"] == 0
    target = processor._engine.target
    assert target is not None
    target.synchronize()  # every copy ran on the simulated device, none from a reused slot
    stats = target.stats()
    assert stats["simulated"]["copies"] == stats["copies"] == 5 and stats["failures"] == 0
    processor.close()


def test_small_samples_also_go_through_pinned_staging_with_a_device() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16, device=SIM)
    samples = _samples(50, width=3)
    assert torch.equal(torch.cat(list(processor(samples))), torch.stack(samples))
    assert _transfers(processor) == 4  # no stacking on the host: every batch is copied


def test_map_and_out_of_memory_splits_with_a_device() -> None:
    class Oom(RuntimeError):
        pass

    calls = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 4:
            raise Oom
        return batch[:, 0] * 2

    processor = ds.DynamicBatchProcessor(
        max_batch_size=8, min_batch_size=8, oom_errors=(Oom,), device=SIM
    )
    results = processor.map(model, _samples(24))
    assert [float(r) for r in results] == [2.0 * i for i in range(24)]
    assert 8 in calls and max(calls[calls.index(8) + 1 :]) <= 4


def test_padding_with_a_device() -> None:
    lengths = [3, 9, 1, 6, 4, 8, 2, 7]
    samples = [torch.arange(n, dtype=torch.int64) + 1 for n in lengths]
    processor = ds.DynamicBatchProcessor(
        max_batch_size=4, min_batch_size=4, collate="pad", device=SIM
    )
    for batch in processor(samples):
        for row, index in enumerate(batch.indices.tolist()):
            assert torch.equal(batch.data[row, : lengths[index]], samples[index])
            assert int(batch.lengths[row]) == lengths[index]
            assert int(batch.mask[row].sum()) == lengths[index]
    assert _transfers(processor) == 2


def test_serving_with_a_device() -> None:
    with ds.DynamicBatchProcessor(
        model=lambda batch: batch.sum(1), max_batch_size=8, device=SIM
    ) as server:
        futures = server.submit_many(_samples(30, width=100))
        assert [f.result(timeout=30).item() for f in futures] == [100.0 * i for i in range(30)]
        assert _transfers(server) >= 4


@pytest.mark.skipif(ds.build_info()["gpu_usable"], reason="needs a machine without a GPU")
def test_a_device_that_cannot_be_used_is_named_at_construction() -> None:
    for device in ("cuda", "cuda:3", 0, torch.device("cuda", 1)):
        with pytest.raises(ValueError, match=r"device="):
            ds.DynamicBatchProcessor(device=device)
    with pytest.raises(ValueError, match=r"device='cpu'"):
        ds.DynamicBatchProcessor(device="cpu")
    with pytest.raises(TypeError, match=r"device must be"):
        ds.DynamicBatchProcessor(device=1.5)  # type: ignore[arg-type]


def test_a_lost_device_fails_the_pass_with_its_name_and_nothing_hangs() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8, device=SIM)
    target = processor._engine.target
    assert target is not None
    iterator = processor(_samples(64))
    next(iterator)
    target.simulated_device.fail("lost in a test")
    with pytest.raises(_core.DeviceError, match="lost in a test"):
        for _ in iterator:
            pass
    processor.close()


@pytest.mark.gpu
def test_samples_already_on_the_gpu_are_gathered_there() -> None:
    device = torch.device("cuda", 0)
    samples = [torch.full((33,), float(i), device=device) for i in range(70)]
    processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16, device="cuda")
    batches = list(processor(samples))
    assert all(batch.device == device for batch in batches)
    assert torch.equal(torch.cat(batches), torch.stack(samples))
    assert processor._engine.target is not None
    assert processor._engine.target.stats()["transfers"] == 0  # nothing went through the host
    ragged = [torch.arange(n, device=device) + 1 for n in (3, 9, 1, 6, 4)]
    padder = ds.DynamicBatchProcessor(
        max_batch_size=5, min_batch_size=5, collate="pad", device="cuda"
    )
    (batch,) = list(padder(ragged))
    expected = torch.nn.utils.rnn.pad_sequence(ragged, batch_first=True)
    assert torch.equal(batch.data, expected) and batch.mask.device == device
    bad = [*samples[:20], samples[20].double(), *samples[21:]]
    with pytest.raises(ds.InvalidSampleError, match=r"sample 20: dtype torch.float64"):
        list(processor(bad))


def test_pinning_that_fails_falls_back_to_pageable_with_a_warning_in_stats() -> None:
    from dynbatch.engine import Engine
    from dynbatch.transfer import DeviceTarget, SimulatedDeviceConfig

    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8)
    target = DeviceTarget(SIM, simulated=SimulatedDeviceConfig(pinned_limit_bytes=4096))
    engine = Engine(processor._engine.options, target=target)
    iterator = ds.BatchIterator(engine, iter(_samples(32)))
    assert torch.equal(torch.cat(list(iterator)), torch.stack(_samples(32)))
    stats = engine.stats(0)
    assert stats.pinned_fallbacks >= 1 and stats.pinned_error
    assert "page-locking failed" in str(stats)
    engine.close()
    processor.close()


def test_training_steps_with_a_device() -> None:
    torch.manual_seed(0)
    inputs, targets = torch.randn(48, 6), torch.randn(48, 1)
    model = torch.nn.Linear(6, 1)
    reference = torch.nn.Linear(6, 1)
    reference.load_state_dict(model.state_dict())
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8, device=SIM)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for micro in processor.steps(ds.paired(inputs, targets), samples_per_step=16):
        if micro.first:
            optimizer.zero_grad()
        x, y = micro.data
        (torch.nn.functional.mse_loss(model(x), y) * micro.weight).backward()
        if micro.last:
            optimizer.step()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for start in range(0, 48, 16):
        plain.zero_grad()
        x, y = inputs[start : start + 16], targets[start : start + 16]
        torch.nn.functional.mse_loss(reference(x), y).backward()
        plain.step()
    assert all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert _transfers(processor) == 6
