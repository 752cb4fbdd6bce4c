"""dynbatch.transfer on the simulated device: copies land, the staging slot is held until its
copy ran, the fingerprint check fires on early reuse, copies overlap compute in simulated
time, gathers equal torch.stack / pad_sequence bit for bit, bad devices and tensors are named,
a lost device raises instead of hanging. GPU-marked tests repeat the essentials on a card."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.dlpack import from_dlpack

from dynbatch import _core, transfer
from dynbatch.transfer import (
    SIMULATED_DEVICE,
    DeviceError,
    DeviceTarget,
    SimulatedDeviceConfig,
    prefetch,
)

MS = 1_000_000


def _descriptor(sample: torch.Tensor) -> _core.LeafDescriptor:
    code, bits = {torch.float32: (2, 32), torch.int64: (0, 64)}[sample.dtype]
    return (list(sample.shape), code, bits, 1)


def collated(
    samples: list[torch.Tensor], pool: _core.StagingPool
) -> tuple[list[torch.Tensor], _core.Batch]:
    """The samples collated by the core into a slot of ``pool``, as the former does."""
    batch = _core.collate(
        [_descriptor(samples[0])], [s.data_ptr() for s in samples], len(samples), pool
    )
    return [from_dlpack(batch.leaf(0))], batch


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


@pytest.fixture
def target() -> Iterator[DeviceTarget]:
    with DeviceTarget(SIMULATED_DEVICE) as t:
        yield t


def test_a_staged_batch_lands_on_the_device_with_its_slot_pinned(target: DeviceTarget) -> None:
    pool = target.staging_pool(3)
    samples = [torch.randn(5, 7) for _ in range(9)]
    leaves, batch = collated(samples, pool)
    numbers = torch.arange(9)  # a leaf outside the slot, as number leaves are
    staged = target.stage([leaves[0], numbers], batch)
    out, copied_numbers = staged.wait()
    assert torch.equal(out, torch.stack(samples))
    assert torch.equal(copied_numbers, numbers)
    assert out.data_ptr() != leaves[0].data_ptr()  # device memory, not the slot
    stats = pool.stats()
    assert stats["pinned_bytes"] == stats["pooled_bytes"] > 0
    assert stats["pinned_fallbacks"] == 0
    assert target.stats()["transfers"] == 1 and target.stats()["bytes"] == 9 * 35 * 4 + 9 * 8
    assert target.name == "simulated" and target.device == torch.device("cpu")


def test_the_slot_returns_only_after_its_copy_ran(target: DeviceTarget) -> None:
    pool = target.staging_pool(1)
    samples = [torch.full((64,), float(i)) for i in range(4)]
    leaves, batch = collated(samples, pool)
    gate = target.simulated_device.hold(target.copy_stream)  # the copy cannot run yet
    staged = target.stage(leaves, batch)
    del leaves, batch
    assert not staged.done()
    assert pool.stats()["slots_in_use"] == 1  # held by the pending copy, not by Python
    # The next batch cannot take (and overwrite) the slot: it gets a one-off buffer.
    _, second = collated([torch.zeros(64)] * 4, pool)
    assert pool.stats()["one_off_allocations"] == 1
    del second
    gate.open()
    (out,) = staged.wait()
    assert torch.equal(out, torch.stack(samples))
    wait_until(lambda: pool.stats()["slots_in_use"] == 0)
    assert target.simulated_device.first_error() == ""


def test_a_slot_reused_before_its_copy_ran_fails_loudly(target: DeviceTarget) -> None:
    pool = target.staging_pool(1)
    leaves, batch = collated([torch.ones(256)] * 2, pool)
    gate = target.simulated_device.hold(target.copy_stream)
    staged = target.stage(leaves, batch)
    leaves[0].fill_(2.0)  # the slot rewritten before its copy ran, as an early reuse would
    gate.open()
    with pytest.raises(DeviceError, match="changed between enqueue and execution"):
        staged.wait()


def test_copies_of_the_next_batch_overlap_the_model_in_simulated_time() -> None:
    copy_ns = compute_ns = 2 * MS
    count = 30

    def run(depth: int) -> int:
        config = SimulatedDeviceConfig(copy_delay_us=(copy_ns / 1e3,) * 2, real_time=False)
        with DeviceTarget(SIMULATED_DEVICE, simulated=config) as target:
            pool = target.staging_pool(depth + 2)
            sim = target.simulated_device

            def batches() -> Iterator[tuple[list[torch.Tensor], _core.Batch]]:
                for k in range(count):
                    yield collated([torch.full((32,), float(k))] * 8, pool)

            for k, (out,) in enumerate(prefetch(target, batches(), depth=depth)):
                assert bool((out == k).all())
                sim.host_work(compute_ns)  # the model
            return sim.host_time_ns()

    ideal = count * max(copy_ns, compute_ns)
    overlapped, serial = run(1), run(0)
    assert overlapped == (count + 1) * 2 * MS  # only the first copy is not hidden
    assert overlapped / ideal <= 1.1
    assert serial == count * 4 * MS


def test_many_batches_with_random_copy_delays_arrive_intact() -> None:
    config = SimulatedDeviceConfig(copy_delay_us=(0.0, 300.0), seed=5)
    with DeviceTarget(SIMULATED_DEVICE, simulated=config) as target:
        pool = target.staging_pool(2)

        def batches() -> Iterator[tuple[list[torch.Tensor], _core.Batch]]:
            for k in range(300):
                yield collated([torch.full((k % 17 + 1, 3), float(k))] * (k % 5 + 1), pool)

        for k, (out,) in enumerate(prefetch(target, batches(), depth=2)):
            assert out.shape == (k % 5 + 1, k % 17 + 1, 3)
            assert bool((out == k).all()), k
        assert target.simulated_device.first_error() == ""
        wait_until(lambda: pool.stats()["slots_in_use"] == 0)
        assert pool.stats()["pooled_slots"] == 2


def test_pinning_failure_falls_back_to_pageable_and_still_copies() -> None:
    config = SimulatedDeviceConfig(pinned_limit_bytes=64 * 1024)
    with DeviceTarget(SIMULATED_DEVICE, simulated=config) as target:
        pool = target.staging_pool(2)
        samples = [torch.randn(1000) for _ in range(40)]  # 160 kB: more than the limit
        leaves, batch = collated(samples, pool)
        (out,) = target.to_device(leaves, batch)
        assert torch.equal(out, torch.stack(samples))
        stats = pool.stats()
        assert stats["pinned_fallbacks"] == 1
        assert "out of page-locked memory" in stats["pinned_error"]
        assert stats["pinned_bytes"] == 0


def test_a_lost_device_raises_and_nothing_hangs() -> None:
    target = DeviceTarget(SIMULATED_DEVICE)
    pool = target.staging_pool(2)
    leaves, batch = collated([torch.ones(8)] * 3, pool)
    target.simulated_device.hold(target.copy_stream)  # never opened: only the failure ends it
    staged = target.stage(leaves, batch)
    target.simulated_device.fail("the card was reset")
    with pytest.raises(DeviceError, match="device lost: the card was reset"):
        staged.wait()
    with pytest.raises(DeviceError, match="device lost"):
        target.stage(leaves, batch)
    target.close()
    target.close()
    with pytest.raises(RuntimeError, match="closed"):
        target.stage(leaves, batch)


# -- gathers of samples already on the device -------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> Any:
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(
        dtype
    )


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (3,), (7, 5), (2, 3, 5)])
def test_gather_equals_torch_stack_bit_for_bit(
    target: DeviceTarget, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(hash((str(dtype), shape)) % 2**31)
    for count in (1, 5, 64):
        samples = [_random(shape, dtype, generator) for _ in range(count)]
        out = target.gather(samples)
        expected = torch.stack(samples)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert torch.equal(_bits(out), _bits(expected))


def test_gather_takes_non_contiguous_samples_and_many_of_them(target: DeviceTarget) -> None:
    base = torch.randn(1024, 6, 4)
    samples = [base[i].t() for i in range(1024)]  # views, not contiguous
    assert torch.equal(target.gather(samples), torch.stack(samples))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trailing", [(), (3,), (2, 5)])
def test_gather_pad_equals_pad_sequence_bit_for_bit(
    target: DeviceTarget, dtype: torch.dtype, trailing: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(7)
    lengths = [3, 0, 7, 1, 7, 2]
    samples = [_random((n, *trailing), dtype, generator) for n in lengths]
    value: float | bool = (
        True if dtype == torch.bool else (7 if not dtype.is_floating_point else -1.5)
    )
    if dtype.is_complex:
        value = -1.5
    out, got_lengths = target.gather_pad(samples, padding_value=value)
    expected = pad_sequence(samples, batch_first=True, padding_value=value)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.equal(_bits(out), _bits(expected))
    assert got_lengths.tolist() == lengths


def test_gather_pad_rounds_the_length_up_and_pads_with_nan(target: DeviceTarget) -> None:
    samples = [torch.randn(n, 3) for n in (5, 2, 9)]
    out, _ = target.gather_pad(samples, padding_value=float("nan"), pad_to_multiple_of=8)
    expected = pad_sequence(samples, batch_first=True, padding_value=float("nan"))
    assert out.shape == (3, 16, 3)
    assert torch.equal(_bits(out[:, :9]), _bits(expected))
    assert bool(out[:, 9:].isnan().all())


def test_gather_names_bad_samples(target: DeviceTarget) -> None:
    ok = torch.zeros(3)
    with pytest.raises(ValueError, match="sample 1 is on meta; the target is cpu"):
        target.gather([ok, torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match=r"sample 2 has shape \(4,\), sample 0 has \(3,\)"):
        target.gather([ok, ok, torch.zeros(4)])
    with pytest.raises(ValueError, match=r"sample 1 has dtype torch\.int64"):
        target.gather([ok, torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="empty"):
        target.gather([])
    with pytest.raises(TypeError, match="sample 1 is a list"):
        target.gather([ok, [1, 2, 3]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="padding needs at least one dimension"):
        target.gather_pad([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        target.gather_pad([ok], pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="cannot be represented"):
        target.gather_pad([torch.zeros(2, dtype=torch.uint8)], padding_value=300)


# -- devices that cannot be used -----------------------------------------------------------


def test_stage_names_a_leaf_on_another_device(target: DeviceTarget) -> None:
    with pytest.raises(ValueError, match="leaf 1 is on meta; the target is cpu"):
        target.stage([torch.zeros(2), torch.zeros(2, device="meta")])
    with pytest.raises(TypeError, match="leaf 0 is a int"):
        target.stage([3])  # type: ignore[list-item]


@pytest.mark.skipif(transfer.build_info()["gpu_usable"], reason="this machine has a usable GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0), 0])
def test_cuda_without_a_usable_gpu_is_a_clear_error_at_construction(device: Any) -> None:
    with pytest.raises(ValueError, match=r"device=.*(no CUDA|no usable CUDA GPU|cannot use CUDA)"):
        DeviceTarget(device)


def test_bad_device_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"device='cpu': .*not to 'cpu'"):
        DeviceTarget("cpu")
    with pytest.raises(ValueError, match="device='warp-drive' is not a device"):
        DeviceTarget("warp-drive")
    with pytest.raises(TypeError, match=r"device must be .* got float"):
        DeviceTarget(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got bool"):
        DeviceTarget(True)
    with pytest.raises(ValueError, match="simulated= applies to device='dynbatch-sim' only"):
        DeviceTarget("cuda", simulated=SimulatedDeviceConfig())


def test_a_device_index_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a one-GPU machine would answer: the index is checked before any device call.
    info = dict(transfer.build_info(), cuda_compiled=True, gpu_usable=True, gpu_count=1)
    monkeypatch.setattr(transfer, "build_info", lambda: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"device='cuda:3': no such device; this machine has 1"):
        DeviceTarget("cuda:3")
    info["cuda_compiled"] = False
    with pytest.raises(ValueError, match="device='cuda:0': this build of dynbatch has no CUDA"):
        DeviceTarget("cuda:0")


def test_prefetch_checks_its_depth(target: DeviceTarget) -> None:
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        next(prefetch(target, [], depth=-1))


# -- on a real GPU (skipped without one) ------------------------------------------------------


@pytest.mark.gpu
def test_gpu_staged_batches_land_and_the_current_stream_waits() -> None:
    with DeviceTarget("cuda") as target:
        pool = target.staging_pool(2)
        assert pool.stats()["pinned_fallbacks"] == 0
        side = torch.cuda.Stream()
        for k in range(50):
            samples = [torch.full((256, 256), float(k + i)) for i in range(16)]
            leaves, batch = collated(samples, pool)
            staged = target.stage(leaves, batch)
            with torch.cuda.stream(side):  # the consumer's stream is whatever is current
                (out,) = staged.wait()
                total = out.sum()
            assert out.device.type == "cuda"
            assert torch.equal(out.cpu(), torch.stack(samples))
            assert float(total) == float(torch.stack(samples).sum())
        assert pool.stats()["pinned_bytes"] > 0


@pytest.mark.gpu
def test_gpu_gather_equals_torch_stack_and_pad_sequence() -> None:
    with DeviceTarget("cuda") as target:
        generator = torch.Generator().manual_seed(3)
        for dtype in DTYPES:
            samples = [_random((7, 5), dtype, generator).cuda() for _ in range(33)]
            assert torch.equal(_bits(target.gather(samples)), _bits(torch.stack(samples)))
            ragged = [_random((n, 3), dtype, generator).cuda() for n in (4, 0, 9, 1)]
            value = True if dtype == torch.bool else 1
            out, _ = target.gather_pad(ragged, padding_value=value)
            expected = pad_sequence(ragged, batch_first=True, padding_value=value)
            assert torch.equal(_bits(out), _bits(expected))


@pytest.mark.gpu
def test_gpu_index_past_the_last_device_is_named() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"no such device; this machine has {count}"):
        DeviceTarget(f"cuda:{count}")
    with pytest.raises(ValueError, match="sample 0 is on cpu"):
        DeviceTarget("cuda").gather([torch.zeros(2)])
