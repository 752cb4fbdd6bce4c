"""The iterator API: every sample exactly once, in order, in batches of the allowed sizes."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import dynbatch as ds


def tagged(count: int, width: int = 4) -> list[torch.Tensor]:
    """Sample i is filled with the value i, so any batch reveals which samples it holds."""
    return [torch.full((width,), float(i)) for i in range(count)]


def batch_sizes_ok(sizes: list[int], low: int, high: int) -> bool:
    return all(low <= size <= high for size in sizes[:-1]) and 1 <= sizes[-1] <= high


@pytest.mark.parametrize("count", [1, 7, 8, 100, 1000])
def test_every_sample_once_in_order(count: int) -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=8)
    seen: list[float] = []
    sizes: list[int] = []
    for batch in processor(tagged(count)):
        assert batch.shape[1:] == (4,)
        assert torch.equal(batch, batch[:, :1].expand_as(batch))
        seen.extend(batch[:, 0].tolist())
        sizes.append(len(batch))
    assert seen == [float(i) for i in range(count)]
    assert batch_sizes_ok(sizes, 8, 64)
    processor.close()


def test_generator_input_and_empty_input() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=4)

    def generate() -> Iterator[torch.Tensor]:
        yield from tagged(50)

    assert sum(len(batch) for batch in processor(generate())) == 50
    assert list(processor([])) == []
    assert list(processor(iter(()))) == []


def test_batches_equal_default_collate_for_nested_samples() -> None:
    Point = collections.namedtuple("Point", "x y")
    samples = [
        {
            "image": torch.randn(3, 5, 2),
            "ids": np.arange(6, dtype=np.int32) + i,
            "label": i,
            "weight": 0.5 * i,
            "flag": i % 2 == 0,
            "pair": (torch.tensor(float(i)), np.float32(i)),
            "point": Point(torch.randn(2), i),
            "seq": [torch.zeros(2, dtype=torch.bfloat16) + i, torch.ones(1, dtype=torch.int64)],
        }
        for i in range(40)
    ]
    processor = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=4)
    start = 0
    for batch in processor(samples):
        size = len(batch["label"])
        expected = _tuples_kept(default_collate(samples[start : start + size]), samples[0])
        _assert_same_structure_and_values(batch, expected)
        start += size
    assert start == len(samples)


def _tuples_kept(collated: object, like: object) -> object:
    """default_collate turns tuples into lists; dynbatch keeps the sample's structure."""
    if isinstance(like, dict):
        assert isinstance(collated, dict)
        return {key: _tuples_kept(collated[key], like[key]) for key in like}
    if isinstance(like, (list, tuple)):
        assert isinstance(collated, (list, tuple))
        items = [_tuples_kept(c, item) for c, item in zip(collated, like, strict=True)]
        return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
    return collated


def _assert_same_structure_and_values(actual: object, expected: object) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected)
        for key in expected:
            _assert_same_structure_and_values(actual[key], expected[key])
    else:
        assert type(actual) is type(expected)
        assert isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple))
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected, strict=True):
            _assert_same_structure_and_values(got, want)


def test_non_contiguous_and_readonly_leaves_are_copied_correctly() -> None:
    base = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    samples = [base.transpose(1, 2) + i for i in range(10)]  # non-contiguous views
    readonly = [np.arange(5.0) + i for i in range(10)]
    for array in readonly:
        array.setflags(write=False)
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    assert torch.equal(torch.cat(list(processor(samples))), torch.stack(samples))
    assert torch.equal(torch.cat(list(processor(readonly))), torch.from_numpy(np.stack(readonly)))


def test_batches_the_caller_keeps_stay_valid() -> None:
    """Holding every batch must neither deadlock the pool nor let a later batch overwrite it."""
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8)
    kept = list(processor(tagged(200)))
    assert torch.equal(torch.cat(kept), torch.stack(tagged(200)))


def test_next_batch_is_prepared_while_the_caller_works() -> None:
    # Samples the core copies (over 16 KiB): smaller ones are stacked on the caller's thread.
    processor = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8)
    pause_s = 0.05
    for _ in processor(tagged(64, width=8192)):
        time.sleep(pause_s)
    records = processor._engine.recorder.snapshot()["recent"]
    # (sequence, size, target, first_enqueue, formed, delivered, collate, compute, memory)
    for previous, record in itertools.pairwise(records):
        formed_ns, delivered_ns = record[4], record[5]
        assert delivered_ns - formed_ns > pause_s * 1e9 * 0.5, "batch was not formed ahead"
        assert formed_ns < previous[5] + pause_s * 1e9


def test_processor_is_reusable_and_accumulates_stats() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=32, min_batch_size=8)
    for _ in range(3):
        assert sum(len(b) for b in processor(tagged(100))) == 100
    assert processor.stats().samples == 300


def test_closed_processor_refuses_new_iterations() -> None:
    processor = ds.DynamicBatchProcessor()
    iterator = processor(tagged(100))
    next(iterator)
    processor.close()
    processor.close()  # idempotent
    with pytest.raises(StopIteration):
        next(iterator)
    with pytest.raises(RuntimeError, match="closed"):
        processor(tagged(3))


def test_context_manager_closes(no_thread_left: None) -> None:
    with ds.DynamicBatchProcessor(max_batch_size=8) as processor:
        iterator = processor(tagged(100))
        next(iterator)
    with pytest.raises(StopIteration):
        next(iterator)
    del processor, iterator


def test_collate_function_matches_default_collate() -> None:
    samples = [
        {"x": torch.randn(3, 2), "y": i, "z": np.ones(2, dtype=np.float16)} for i in range(9)
    ]
    samples[0]["pair"] = (1, torch.ones(1))
    for sample in samples[1:]:
        sample["pair"] = (2, torch.zeros(1))
    _assert_same_structure_and_values(
        ds.collate(samples), _tuples_kept(default_collate(samples), samples[0])
    )
    with pytest.raises(ValueError, match="at least one sample"):
        ds.collate([])
    with pytest.raises(TypeError, match="sequence of samples"):
        ds.collate(torch.randn(3))  # type: ignore[arg-type]


def test_collate_as_dataloader_collate_fn() -> None:
    dataset = tagged(50)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=ds.collate)
    assert torch.equal(torch.cat(list(loader)), torch.stack(dataset))


def test_interpreter_exit_with_a_live_iteration_neither_hangs_nor_crashes() -> None:
    import subprocess
    import sys

    script = (
        "import torch, dynbatch as ds\n"
        "bp = ds.DynamicBatchProcessor(max_batch_size=8)\n"
        "it = bp([torch.zeros(3)] * 1000)\n"
        "batch = next(it)\n"
        "it.cycle = it  # kept alive by a cycle until the interpreter ends\n"
        "print('exiting')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exiting"


def test_closing_from_another_thread_ends_the_loop_cleanly(no_thread_left: None) -> None:
    import threading

    data = [torch.randn(256, 256) for _ in range(2000)]  # 16 MiB batches: copies take a while
    errors: list[BaseException] = []
    seen: list[int] = []

    def loop(processor: ds.DynamicBatchProcessor) -> None:
        try:
            for batch in processor(data):
                seen.append(len(batch))
        except BaseException as error:  # any exception here is the failure
            errors.append(error)

    for _ in range(10):
        seen.clear()
        processor = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=64)
        worker = threading.Thread(target=loop, args=(processor,))
        worker.start()
        time.sleep(0.02)
        processor.close()  # mid-way through, most likely while a batch is being copied
        worker.join(timeout=30)
        assert not worker.is_alive() and not errors, errors
        assert all(size == 64 for size in seen[:-1])
        del processor


class _Encoding(collections.UserDict):  # type: ignore[type-arg]
    """Stands in for transformers' BatchEncoding: a mapping type built from a dict."""


def test_mapping_samples_keep_their_type_when_it_can_be_built_from_a_dict() -> None:
    samples = [_Encoding(ids=torch.full((3,), i), mask=torch.ones(3)) for i in range(10)]
    with ds.DynamicBatchProcessor(max_batch_size=10, min_batch_size=10) as processor:
        (batch,) = list(processor(samples))
        assert type(batch) is _Encoding
        assert torch.equal(batch["ids"][:, 0], torch.arange(10))
        odd = [collections.defaultdict(int, x=torch.zeros(2)) for _ in range(10)]
        (plain,) = list(processor(odd))  # defaultdict(mapping) is not a constructor call
        assert type(plain) is dict and plain["x"].shape == (10, 2)
