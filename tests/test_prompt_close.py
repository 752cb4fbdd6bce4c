"""Timeouts and close() do not wait for the model: a request's deadline fires while a batch is
in the model, close(drain=False) returns with the model still running (a hung model call is
abandoned), and every request has ended when close() returns.

The model is held on an event the test releases only after its checks, so "promptly" is
checked by order of events (the timeout or the close happened while the model was still
held), not by a clock; the bounds given to waits only turn a hang into a failure."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import torch

import dynbatch as ds

from .conftest import os_thread_count
from .serving_models import RecordingModel, tag, wait_until

HANG_S = 20.0  # longer than any correct run takes; only a hang reaches it


def processor(model: Any, **options: Any) -> ds.DynamicBatchProcessor:
    options.setdefault("max_delay_ms", 0.0)
    return ds.DynamicBatchProcessor(model=model, **options)


def test_a_deadline_fires_while_the_model_is_busy() -> None:
    model = RecordingModel()
    bp = processor(model, max_batch_size=1)
    try:
        model.hold()
        running = bp.submit(tag(0))
        assert model.entered.wait(HANG_S)
        waiting = bp.submit(tag(1), timeout=0.2)
        assert isinstance(waiting.exception(HANG_S), ds.RequestTimeout)
        assert model.calls == []  # the batch is still in the model
        model.release()
        assert running.result(HANG_S).item() == 0.0
        assert model.seen == [0]  # the late request never reached the model
        assert bp.stats().timeouts == 1
    finally:
        model.release()
        bp.close()


def test_requests_of_a_batch_formed_ahead_time_out_while_the_model_is_busy() -> None:
    model = RecordingModel()
    bp = processor(model, max_batch_size=2, min_batch_size=2)
    try:
        model.hold()
        running = bp.submit_many([tag(0), tag(1)])
        assert model.entered.wait(HANG_S)
        # A full batch: the former collates it ahead, and it waits for the busy worker.
        ahead = bp.submit_many([tag(2), tag(3)], timeout=0.2)
        fine = bp.submit_many([tag(4), tag(5)])
        for future in ahead:
            assert isinstance(future.exception(HANG_S), ds.RequestTimeout)
        assert model.calls == []
        model.release()
        assert [f.result(HANG_S).item() for f in running + fine] == [0.0, 10.0, 40.0, 50.0]
        assert sorted(model.seen) == [0, 1, 4, 5]
        assert bp.stats().timeouts == 2
    finally:
        model.release()
        bp.close()


def test_infer_times_out_while_the_model_is_busy() -> None:
    import asyncio

    model = RecordingModel()
    bp = processor(model, max_batch_size=1)

    async def scenario() -> BaseException | None:
        model.hold()
        running = asyncio.ensure_future(bp.infer(tag(0)))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, HANG_S)
        try:
            await asyncio.wait_for(bp.infer(tag(1), timeout=0.2), HANG_S)
        except ds.RequestTimeout as error:
            caught: BaseException | None = error
        else:
            caught = None
        still_held = model.calls == []
        model.release()
        await running
        return caught if still_held else None

    try:
        assert isinstance(asyncio.run(scenario()), ds.RequestTimeout)
    finally:
        model.release()
        bp.close()


def test_close_without_drain_returns_while_the_model_is_busy() -> None:
    model = RecordingModel()
    bp = processor(model, max_batch_size=2)
    model.hold()
    running = bp.submit(tag(0))
    assert model.entered.wait(HANG_S)
    queued = bp.submit_many([tag(i) for i in range(1, 20)])
    closer = threading.Thread(target=bp.close, kwargs={"drain": False})
    closer.start()
    closer.join(HANG_S)
    try:
        assert not closer.is_alive()
        assert model.calls == []  # close() returned while the model still held the batch
        # Every request has ended: the queued ones never ran, the running one was abandoned.
        for future in queued:
            with pytest.raises(ds.ProcessorClosed, match="closed before this request ran"):
                future.result(0)
        with pytest.raises(ds.ProcessorClosed, match="abandoned"):
            running.result(0)
    finally:
        model.release()
    assert wait_until(lambda: model.seen == [0], HANG_S)  # the model call ran to its end
    assert running.exception(0) is not None  # its output was discarded
    with pytest.raises(ds.ProcessorClosed):
        bp.submit(tag(99))


def test_close_abandons_a_hung_model_call_past_its_drain_timeout() -> None:
    gate = threading.Event()

    def hung(batch: torch.Tensor) -> torch.Tensor:
        gate.wait(60)
        return batch

    bp = processor(hung, max_batch_size=1)
    first = bp.submit(tag(0))
    assert wait_until(lambda: bp.stats().batches == 1, HANG_S)
    second = bp.submit(tag(1))
    closer = threading.Thread(target=bp.close, kwargs={"drain": True, "timeout": 0.1})
    closer.start()
    closer.join(HANG_S)
    try:
        assert not closer.is_alive()
        assert not gate.is_set()
        assert isinstance(first.exception(0), ds.ProcessorClosed)
        assert isinstance(second.exception(0), ds.ProcessorClosed)
    finally:
        gate.set()


def test_an_abandoned_worker_stops_once_its_model_call_returns() -> None:
    assert wait_until(lambda: not _dynbatch_threads(), HANG_S)  # earlier tests' workers
    gc.collect()
    baseline = os_thread_count()
    model = RecordingModel()
    bp = processor(model, max_batch_size=1)
    model.hold()
    bp.submit(tag(0))
    assert model.entered.wait(HANG_S)
    bp.close(drain=False)
    assert [t.name for t in _dynbatch_threads()] == ["dynbatch-worker"]  # still in the model
    model.release()
    del bp
    # The worker ends once the model returns, and no core thread lingers.
    assert wait_until(lambda: not _dynbatch_threads(), HANG_S)
    assert wait_until(lambda: (gc.collect(), os_thread_count())[1] == baseline, HANG_S)


def _dynbatch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dynbatch")]
