"""Misuse is named, not half-served: one iterator consumed from two threads, close(drain=True)
and a blocking submit from a done-callback, sparse and deeply nested samples, and a queue size
too large to allocate each get a clear answer."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import dynbatch as ds

from .serving_models import RecordingModel, tag

HANG_S = 20.0  # only a hang reaches it


# ----------------------------------------------------------------- iterator from two threads


def test_an_iterator_used_from_a_second_thread_at_once_raises_and_loses_nothing() -> None:
    reading = threading.Event()
    go_on = threading.Event()

    def samples() -> Iterator[torch.Tensor]:
        for i in range(100):
            if i == 50:  # the first thread is inside next(), reading its input
                reading.set()
                go_on.wait(HANG_S)
            yield torch.full((2,), float(i))

    iterator = ds.DynamicBatchProcessor(max_batch_size=8, min_batch_size=8)(samples())
    first: list[float] = []

    def consume() -> None:
        first.extend(v for batch in iterator for v in batch[:, 0].tolist())

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert reading.wait(HANG_S)
    with pytest.raises(RuntimeError, match="another thread is iterating"):
        next(iterator)
    go_on.set()
    consumer.join(HANG_S)
    assert first == [float(i) for i in range(100)]  # every batch, to the one consumer


def test_taking_turns_from_two_threads_delivers_every_batch_once() -> None:
    iterator = ds.DynamicBatchProcessor(max_batch_size=4, min_batch_size=4)(
        torch.full((2,), float(i)) for i in range(40)
    )
    seen: list[float] = []
    lock = threading.Lock()

    def take_some() -> None:
        for _ in range(5):
            with lock:  # one at a time: not concurrent use
                seen.extend(next(iterator)[:, 0].tolist())

    threads = [threading.Thread(target=take_some) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    assert seen == [float(i) for i in range(40)]


# ------------------------------------------------------------- from a done-callback


def test_close_with_drain_from_a_done_callback_drains() -> None:
    model = RecordingModel(delay_s=0.001)
    bp = ds.DynamicBatchProcessor(model=model, max_batch_size=4, max_delay_ms=0.0)
    model.hold()
    first = bp.submit(tag(0))
    assert model.entered.wait(HANG_S)
    queued = bp.submit_many([tag(i) for i in range(1, 200)])
    errors: list[BaseException] = []

    def close_draining(_: Any) -> None:
        try:
            bp.close(drain=True)
        except BaseException as error:
            errors.append(error)

    first.add_done_callback(close_draining)
    model.release()
    assert [f.result(HANG_S).item() for f in queued] == [10.0 * i for i in range(1, 200)]
    assert not errors
    with pytest.raises(ds.ProcessorClosed):
        bp.submit(tag(1))


def test_a_blocking_submit_from_a_done_callback_fails_at_once_when_the_queue_is_full() -> None:
    model = RecordingModel()
    bp = ds.DynamicBatchProcessor(
        model=model, max_batch_size=1, max_delay_ms=0.0, max_queue_size=2, block_timeout=HANG_S
    )
    try:
        model.hold()
        first = bp.submit(tag(0))
        assert model.entered.wait(HANG_S)
        for i in (1, 2, 3):  # one batch formed ahead, then two queued: the queue is full
            bp.submit(tag(i))
        outcome: list[BaseException | None] = []
        called = threading.Event()

        def submit_more(_: Any) -> None:
            try:
                bp.submit(tag(4))
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)
            called.set()

        first.add_done_callback(submit_more)
        model.release()
        assert called.wait(HANG_S)
        assert len(outcome) == 1 and isinstance(outcome[0], ds.QueueFull)
        assert "done-callback" in str(outcome[0])
    finally:
        model.release()
        bp.close()


# ----------------------------------------------------------------------- bad input


def sparse_csr() -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.eye(3).to_sparse_csr()


def test_a_sparse_csr_sample_is_named_by_the_iterator() -> None:
    samples = [torch.eye(3), torch.eye(3), sparse_csr()]
    processor = ds.DynamicBatchProcessor(max_batch_size=8)
    with pytest.raises(ds.UnsupportedLeafError, match=r"sample 2.*sparse_csr"):
        list(processor(samples))


def test_a_sparse_csr_request_is_named_by_submit() -> None:
    with ds.DynamicBatchProcessor(model=lambda b: b, max_delay_ms=0.0) as bp:
        bp.submit(torch.eye(3)).result(HANG_S)
        with pytest.raises(ds.UnsupportedLeafError, match=r"request 1.*sparse_csr"):
            bp.submit(sparse_csr())
        with pytest.raises(ds.UnsupportedLeafError, match=r"request 3.*sparse_csr"):
            bp.submit_many([torch.eye(3), sparse_csr()])


def test_a_sparse_csr_sample_is_named_by_collate() -> None:
    with pytest.raises(ds.UnsupportedLeafError, match=r"sample 1.*sparse_csr"):
        ds.collate([torch.eye(3), sparse_csr()])


def nested(depth: int) -> Any:
    sample: Any = torch.ones(2)
    for _ in range(depth):
        sample = [sample]
    return sample


def test_very_deep_nesting_is_named() -> None:
    deep = nested(5000)
    with pytest.raises(ds.InvalidSampleError, match=r"sample 0.*nested more than"):
        list(ds.DynamicBatchProcessor()([deep]))
    with pytest.raises(ds.InvalidSampleError, match=r"sample 1.*nested more than"):
        ds.collate([nested(3), deep])
    with (
        ds.DynamicBatchProcessor(model=lambda b: b, max_delay_ms=0.0) as bp,
        pytest.raises(ds.InvalidSampleError, match=r"request 0.*nested more than"),
    ):
        bp.submit(deep)


def test_nesting_within_the_limit_batches() -> None:
    batch = ds.collate([nested(60), nested(60)])
    for _ in range(60):
        batch = batch[0]
    assert batch.shape == (2, 2)


def test_max_queue_size_has_an_upper_bound() -> None:
    with pytest.raises(ValueError, match="max_queue_size must be at most"):
        ds.DynamicBatchProcessor(model=lambda b: b, max_queue_size=10**8)
