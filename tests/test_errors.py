"""Bad input gets a clear error naming the sample and the leaf; nothing read is lost."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import dynbatch as ds

from .conftest import os_thread_count


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_batch_size": 4, "min_batch_size": 8}, ValueError, "at least min_batch_size"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be at least 1"),
        ({"min_batch_size": 0}, ValueError, "min_batch_size must be at least 1"),
        ({"min_batch_size": -3}, ValueError, "min_batch_size"),
        ({"max_batch_size": 8.0}, TypeError, "max_batch_size must be an int"),
        ({"max_batch_size": True}, TypeError, "max_batch_size must be an int"),
        ({"prefetch": 0}, ValueError, "prefetch"),
        ({"memory_fraction": 0.0}, ValueError, "memory_fraction"),
        ({"memory_fraction": "half"}, TypeError, "memory_fraction"),
        ({"telemetry": object()}, TypeError, "telemetry"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ds.DynamicBatchProcessor(**kwargs)  # type: ignore[arg-type]


def test_non_iterable_input_is_refused_at_call_time() -> None:
    processor = ds.DynamicBatchProcessor()
    with pytest.raises(TypeError, match=r"expects an iterable of samples .*got int"):
        processor(5)  # type: ignore[arg-type]


def _deliver_until_error(
    processor: ds.DynamicBatchProcessor, samples: object
) -> tuple[int, BaseException]:
    delivered = 0
    with pytest.raises(Exception) as caught:
        for batch in processor(samples):  # type: ignore[arg-type]
            delivered += len(batch) if not isinstance(batch, dict) else len(batch["x"])
    return delivered, caught.value


def test_shape_mismatch_names_sample_and_leaf_after_delivering_earlier_samples() -> None:
    samples = [{"x": torch.zeros(4), "y": torch.zeros(2)} for _ in range(30)]
    samples[21] = {"x": torch.zeros(4), "y": torch.zeros(3)}
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8)
    delivered, error = _deliver_until_error(processor, samples)
    assert isinstance(error, ds.InvalidSampleError)
    assert (error.index, error.path) == (21, "['y']")
    assert "shape (3,) differs from (2,) of sample 0" in str(error)
    assert delivered == 21, "every sample before the bad one must be delivered"


def test_dtype_mismatch() -> None:
    samples = [torch.zeros(3)] * 5 + [torch.zeros(3, dtype=torch.float64)]
    delivered, error = _deliver_until_error(ds.DynamicBatchProcessor(max_batch_size=2), samples)
    assert isinstance(error, ds.InvalidSampleError)
    assert error.index == 5 and "dtype torch.float64 differs from torch.float32" in str(error)
    assert delivered == 5


def test_structure_mismatch_names_where_it_differs() -> None:
    samples = [{"x": torch.zeros(2), "meta": {"a": 1, "b": 2}} for _ in range(4)]
    samples[3] = {"x": torch.zeros(2), "meta": {"a": 1, "c": 2}}
    _, error = _deliver_until_error(ds.DynamicBatchProcessor(max_batch_size=2), samples)
    assert isinstance(error, ds.InvalidSampleError)
    assert error.index == 3 and error.path == "['meta']"
    assert "keys ['a', 'b']" in str(error) and "keys ['a', 'c']" in str(error)


@pytest.mark.parametrize(
    ("leaf", "match"),
    [("text", "a str cannot be batched"), (None, "a NoneType"), (object(), "a object")],
)
def test_unsupported_leaves(leaf: object, match: str) -> None:
    samples = [(torch.zeros(2), 1)] * 3 + [(torch.zeros(2), leaf)]
    _, error = _deliver_until_error(ds.DynamicBatchProcessor(max_batch_size=2), samples)
    assert isinstance(error, ds.UnsupportedLeafError) and isinstance(error, TypeError)
    assert error.index == 3 and error.path == "[1]" and match in str(error)


def test_unsupported_first_sample_and_dtypes() -> None:
    processor = ds.DynamicBatchProcessor()
    with pytest.raises(ds.UnsupportedLeafError, match=r"sample 0, leaf \['name'\]: a str"):
        next(processor([{"name": "a"}]))
    with pytest.raises(ds.UnsupportedLeafError, match="dtype object"):
        next(processor([np.array([object()])]))
    with pytest.raises(ds.UnsupportedLeafError, match=r"dtype torch\.float8"):
        next(processor([torch.zeros(2, dtype=torch.float8_e4m3fn)]))


def test_number_kinds_are_checked() -> None:
    floats_then_int = [1.5, 2.5, 3]
    batch = next(ds.DynamicBatchProcessor(8, 8)(floats_then_int))
    assert batch.dtype == torch.float64 and batch.tolist() == [1.5, 2.5, 3.0]
    _, error = _deliver_until_error(ds.DynamicBatchProcessor(max_batch_size=8), [1, 2, 2.5])
    assert isinstance(
        error, ds.InvalidSampleError
    ) and "a float where sample 0 has a Python int" in str(error)


def test_exception_from_the_input_is_raised_after_earlier_batches() -> None:
    def broken() -> Iterator[torch.Tensor]:
        for i in range(13):
            yield torch.full((2,), float(i))
        raise OSError("disk went away")

    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    seen: list[float] = []
    with pytest.raises(OSError, match="disk went away"):
        for batch in processor(broken()):
            seen.extend(batch[:, 0].tolist())
    assert seen == [float(i) for i in range(13)]


def test_abandoned_iterations_leak_no_thread_or_buffer() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=4)
    data = [torch.randn(64) for _ in range(200)]
    gc.collect()
    threads_before = os_thread_count()

    def failing_body() -> None:
        for index, _batch in enumerate(processor(data)):
            if index == 2:
                raise KeyError("caller bug")

    for round_ in range(1000):
        if round_ % 2:
            with pytest.raises(KeyError):
                failing_body()
        else:
            iterator = processor(data)
            next(iterator)
            del iterator  # abandoned mid-way, never closed explicitly
    gc.collect()
    assert os_thread_count() == threads_before
    pool = processor._engine.pool.stats()
    assert pool["slots_in_use"] == 0 and pool["one_off_in_use"] == 0
    assert pool["pooled_slots"] == processor.prefetch + 2
    assert torch.equal(torch.cat(list(processor(data))), torch.stack(data))


def test_lazy_conjugate_and_negative_views_are_resolved() -> None:
    z = torch.tensor([1 + 2j, 3 - 4j])
    samples = [z.conj() for _ in range(5)]
    assert torch.equal(
        torch.cat(list(ds.DynamicBatchProcessor(4, 4)(samples))), torch.stack(samples)
    )
    assert torch.equal(ds.collate(samples), torch.stack(samples))
    negative = [torch.tensor([1 + 2j]).conj().imag for _ in range(3)]  # a real view, negative bit
    assert negative[0].is_neg()
    assert torch.equal(ds.collate(negative), torch.stack([t.clone() for t in negative]))
    batches = list(ds.DynamicBatchProcessor(3, 3)(negative))
    assert torch.equal(batches[0], torch.full((3, 1), -2.0))


def test_int_outside_int64_is_named_after_earlier_batches() -> None:
    samples = [1, 2, 3, 4, 5, 2**70]
    processor = ds.DynamicBatchProcessor(4, 4)
    delivered, error = _deliver_until_error(processor, samples)
    assert isinstance(error, ds.InvalidSampleError) and error.index == 5
    assert "does not fit in int64" in str(error) and delivered == 5


def test_big_endian_numpy_arrays_are_read_correctly() -> None:
    arrays = [np.arange(3, dtype=">f4") + i for i in range(4)]
    batch = ds.collate(arrays)
    assert batch.dtype == torch.float32
    assert torch.equal(batch, torch.tensor(np.stack(arrays).astype("<f4")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_slo_ms": float("inf")}, "latency_slo_ms must be between"),
        ({"latency_slo_ms": 1e-9}, "latency_slo_ms must be between"),
        ({"max_batch_size": 2**40}, "read-ahead"),
        ({"prefetch": 2**30, "max_batch_size": 8}, "read-ahead"),
    ],
)
def test_out_of_range_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ds.DynamicBatchProcessor(**kwargs)  # type: ignore[arg-type]


def test_a_shared_telemetry_outlives_one_processor() -> None:
    telemetry = ds._core.Telemetry.host()
    first = ds.DynamicBatchProcessor(8, telemetry=telemetry)
    second = ds.DynamicBatchProcessor(8, telemetry=telemetry)
    first.close()
    assert sum(len(batch) for batch in second([torch.zeros(2)] * 10)) == 10
    assert second.stats().samples == 10
    telemetry.close()


def test_timeouts_of_any_size_are_accepted() -> None:
    former = ds._core.BatchFormer(
        [([2], 2, 32, 1)],
        8,
        1,
        ds._core.StagingPool(3),
        ds._core.SizingController(4, 4),
        ds._core.Telemetry.scripted(10**9, 10**9),
        ds._core.StatsRecorder(),
    )
    former.close_input()
    assert former.next_batch(timeout_s=float("inf")) is None
    assert former.next_batch(timeout_s=1e12) is None
    with pytest.raises(ValueError, match="max_delay_ms"):
        ds._core.BatchFormer(
            [([2], 2, 32, 1)],
            8,
            1,
            ds._core.StagingPool(3),
            ds._core.SizingController(4, 4),
            ds._core.Telemetry.scripted(10**9, 10**9),
            ds._core.StatsRecorder(),
            max_delay_ms=float("inf"),
        )
    former.close()


def test_errors_hint_at_the_fix() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8)
    with pytest.raises(ds.InvalidSampleError, match=r"sample 1: shape \(5,\).*collate='pad'"):
        list(processor([torch.zeros(3), torch.zeros(5)]))
    with pytest.raises(ds.InvalidSampleError, match=r"sample 1: .*list of 4.*torch\.tensor\(ids\)"):
        list(processor([[1, 2, 3], [1, 2, 3, 4]]))
    # Hints only where they apply: a different rank is no padding case.
    with pytest.raises(ds.InvalidSampleError) as caught:
        list(processor([torch.zeros(3), torch.zeros(3, 2)]))
    assert "collate='pad'" not in str(caught.value)
