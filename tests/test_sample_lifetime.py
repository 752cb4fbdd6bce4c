"""A sample's memory lives until the core has copied it, whatever the caller does to the
tensor object meanwhile; the accident of refilling one buffer is named; small lone tensors,
stacked by torch on the caller's thread, batch exactly as the core path does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator

import pytest
import torch

import dynbatch as ds
from dynbatch import _core


def _run(code: str) -> subprocess.CompletedProcess[str]:
    """Crash-prone code runs in its own process: a segfault is a red test, not a dead run."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_iterator_keeps_a_swapped_storage_alive_until_copied() -> None:
    # 1 MiB samples: their storage is its own mapping, so reading it after it was freed faults.
    result = _run(
        """
        import torch, dynbatch as ds

        def samples():
            for i in range(64):
                x = torch.full((256 * 1024,), float(i))
                yield x
                x.set_(torch.empty(0))  # the caller swaps the storage after handing x over

        processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16)
        seen = []
        for batch in processor(samples()):
            assert batch.shape[1] == 256 * 1024
            seen.extend(batch[:, 0].tolist())
            assert bool((batch == batch[:, :1]).all())
        assert seen == [float(i) for i in range(64)], seen
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_submit_keeps_a_swapped_storage_alive_until_copied() -> None:
    result = _run(
        """
        import threading, torch, dynbatch as ds

        gate = threading.Event()

        def model(batch):
            gate.wait(10)  # requests pile up behind the first batch
            return batch.sum(1)

        with ds.DynamicBatchProcessor(model=model, max_batch_size=8, max_delay_ms=1) as server:
            futures = []
            for i in range(40):
                x = torch.full((256 * 1024,), float(i))
                futures.append(server.submit(x))
                x.set_(torch.empty(0))
            gate.set()
            sums = [f.result(timeout=30).item() for f in futures]
        assert sums == [256 * 1024 * float(i) for i in range(40)], sums
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def _refilling(shape: tuple[int, ...], count: int) -> Iterator[torch.Tensor]:
    buffer = torch.empty(shape)
    for i in range(count):
        buffer.fill_(i)
        yield buffer


@pytest.mark.parametrize("features", [8, 64 * 1024])  # stacked by torch / copied by the core
def test_a_generator_refilling_one_buffer_gets_one_warning_naming_samples(features: int) -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"samples [01] and [12] share memory") as caught:
        list(processor(_refilling((features,), 12)))
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_a_list_repeating_one_sample_is_no_accident() -> None:
    x = torch.arange(6.0)
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(processor([x] * 10))
    assert all(torch.equal(batch, x.expand(len(batch), 6)) for batch in batches)


def _variants() -> list[tuple[str, list[torch.Tensor]]]:
    base = torch.arange(40.0).reshape(10, 4)
    wide = torch.arange(80.0).reshape(10, 8)
    return [
        ("float32", [row.clone() for row in base]),
        ("int64", [row.long() for row in base]),
        ("bool", [row.long() % 2 == 0 for row in base]),
        ("strided views", [row[::2] for row in wide]),
        ("negative views", [torch._neg_view(row) for row in base]),
        ("requiring grad", [row.clone().requires_grad_() for row in base]),
        ("2-d", [row.reshape(2, 2) for row in base]),
    ]


@pytest.mark.parametrize(("name", "samples"), _variants(), ids=[n for n, _ in _variants()])
def test_small_lone_tensors_batch_as_torch_stack_does(
    name: str, samples: list[torch.Tensor]
) -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    batches = list(processor(iter(samples)))
    assert [len(b) for b in batches] == [4, 4, 2], name
    expected = torch.stack([s.detach().resolve_neg() for s in samples])
    got = torch.cat(batches)
    assert got.dtype == expected.dtype and torch.equal(got, expected), name
    assert not got.requires_grad


def test_a_stacked_stream_with_a_bad_sample_delivers_the_batches_before_it() -> None:
    samples = [torch.full((3,), float(i)) for i in range(10)]
    samples[6] = torch.zeros(3, dtype=torch.float64)
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    delivered: list[float] = []
    with pytest.raises(ds.InvalidSampleError, match=r"sample 6: dtype torch.float64"):
        for batch in processor(iter(samples)):
            delivered.extend(batch[:, 0].tolist())
    assert delivered == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    samples[6] = torch.zeros(4)
    with pytest.raises(ds.InvalidSampleError, match=r"sample 6: shape \(4,\)"):
        list(processor(iter(samples)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bool])
def test_a_stacked_sample_of_a_dtype_torch_would_promote_to_the_streams_is_named(
    dtype: torch.dtype,
) -> None:
    """torch.stack would cast these silently (the batch keeps float32): the check per batch
    must still find the sample."""
    samples = [torch.full((3,), float(i)) for i in range(10)]
    samples[5] = torch.ones(3, dtype=dtype)
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    delivered: list[float] = []
    with pytest.raises(ds.InvalidSampleError, match=rf"sample 5: dtype {dtype}"):
        for batch in processor(samples):
            delivered.extend(batch[:, 0].tolist())
    assert delivered == [0.0, 1.0, 2.0, 3.0, 4.0]  # every sample before it
    with pytest.raises(ds.InvalidSampleError, match=rf"sample 5: dtype {dtype}"):
        ds.collate(samples)


def test_attributes_are_checks_every_object_by_identity() -> None:
    tensors = [torch.zeros(2) for _ in range(5)]
    assert _core.attributes_are(tensors, "dtype", torch.float32)
    assert _core.attributes_are(tuple(tensors), "dtype", torch.float32)
    assert _core.attributes_are([], "dtype", torch.float32)
    assert not _core.attributes_are(
        [*tensors, torch.zeros(2, dtype=torch.float16)], "dtype", torch.float32
    )
    assert not _core.attributes_are([*tensors, 1.0], "dtype", torch.float32)  # no attribute
    with pytest.raises(TypeError):
        _core.attributes_are(iter(tensors), "dtype", torch.float32)
