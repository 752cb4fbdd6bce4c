"""map() and report_oom(): out-of-memory splits and retries; no sample lost or run twice."""

from __future__ import annotations

import pytest
import torch

import dynbatch as ds

from .simulated_device import SimulatedOOM, tagged_samples


class LimitedModel:
    """Runs out of memory above `limit` samples; records the tags of every successful call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.runs: list[list[int]] = []
        self.failed: list[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > self.limit:
            self.failed.append(len(batch))
            raise SimulatedOOM(f"{len(batch)} samples do not fit")
        tags = batch[:, 0].to(torch.int64)
        self.runs.append(tags.tolist())
        return tags * 10


def test_map_splits_and_retries_without_losing_or_repeating_a_sample() -> None:
    model = LimitedModel(limit=37)
    processor = ds.DynamicBatchProcessor(
        max_batch_size=256, min_batch_size=64, oom_errors=(SimulatedOOM,)
    )
    results = processor.map(model, tagged_samples(3000))
    assert [int(r) for r in results] == [10 * i for i in range(3000)]
    assert sorted(t for run in model.runs for t in run) == list(range(3000))
    assert model.failed and max(len(run) for run in model.runs) <= 37
    stats = processor.stats()
    assert stats.ooms == len(model.failed) and stats.split_batches >= 1
    assert stats.oom_ceiling <= 37  # below min_batch_size: memory wins over a preference
    assert len(model.failed) <= 3, "the ceiling must stop the out-of-memory errors"


def test_report_oom_in_the_iterator_brings_the_same_samples_back_smaller() -> None:
    model = LimitedModel(limit=10)
    processor = ds.DynamicBatchProcessor(
        max_batch_size=32, min_batch_size=32, oom_errors=(SimulatedOOM,)
    )
    seen_sizes = []
    for batch in processor(tagged_samples(200)):
        seen_sizes.append(len(batch))
        try:
            model(batch)
        except SimulatedOOM:
            assert processor.is_out_of_memory(SimulatedOOM())
            processor.report_oom()
    assert sorted(t for run in model.runs for t in run) == list(range(200))
    assert seen_sizes[:4] == [32, 16, 8, 8]  # halves of the failed batch come back first
    assert all(size <= 10 for size in [len(run) for run in model.runs])


def test_report_oom_needs_an_outstanding_batch() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    with pytest.raises(RuntimeError, match="needs a batch"):
        processor.report_oom()
    iterator = processor(tagged_samples(8))
    next(iterator)
    iterator.report_oom()
    with pytest.raises(RuntimeError, match="must follow a batch that failed"):
        iterator.report_oom()


def test_a_single_sample_that_does_not_fit_is_named() -> None:
    model = LimitedModel(limit=0)
    processor = ds.DynamicBatchProcessor(
        max_batch_size=4, min_batch_size=4, oom_errors=(SimulatedOOM,)
    )
    with pytest.raises(ds.DynbatchError, match="sample 0 alone does not fit in memory"):
        processor.map(model, tagged_samples(8))


def test_map_checks_the_model_output() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)
    with pytest.raises(ValueError, match="has 3 rows for a batch of 4 samples"):
        processor.map(lambda batch: batch[:3], tagged_samples(8))
    with pytest.raises(ValueError, match=r"output\['n'\] must be a tensor"):
        processor.map(lambda batch: {"n": 3}, tagged_samples(8))
    with pytest.raises(TypeError, match="callable"):
        processor.map(3, tagged_samples(8))  # type: ignore[arg-type]


def test_map_splits_nested_outputs_per_sample() -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8)
    results = processor.map(
        lambda batch: {"double": batch * 2, "pair": (batch[:, 0], batch.sum(dim=1))},
        tagged_samples(20),
    )
    assert len(results) == 20
    assert torch.equal(results[7]["double"], tagged_samples(20)[7] * 2)
    assert float(results[7]["pair"][0]) == 7.0 and isinstance(results[7]["pair"], tuple)


def test_other_exceptions_propagate_and_leave_no_thread(no_thread_left: None) -> None:
    processor = ds.DynamicBatchProcessor(max_batch_size=8, oom_errors=(SimulatedOOM,))

    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise KeyError("model bug")

    with pytest.raises(KeyError, match="model bug"):
        processor.map(broken, tagged_samples(50))
    processor.close()
    del processor


def test_ceilings_still_apply_after_reset_stats_and_to_queued_parts() -> None:
    model = LimitedModel(limit=10)
    processor = ds.DynamicBatchProcessor(
        max_batch_size=32, min_batch_size=32, oom_errors=(SimulatedOOM,)
    )
    for index, batch in enumerate(processor(tagged_samples(640))):
        if index == 3:
            processor.reset_stats()
        try:
            model(batch)
        except SimulatedOOM:
            processor.report_oom()
    assert sorted(t for run in model.runs for t in run) == list(range(640))
    assert len(model.failed) <= 3, model.failed
