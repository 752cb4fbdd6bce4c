"""submit / submit_many: results, the Future interface, deadlines, cancellation, priorities,
error isolation, queue limits, shutdown and bad input."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dynbatch as ds

from .serving_models import RecordingModel, tag, wait_until


def processor(model: Any, **options: Any) -> ds.DynamicBatchProcessor:
    options.setdefault("max_batch_size", 16)
    options.setdefault("max_delay_ms", 2.0)
    return ds.DynamicBatchProcessor(model=model, **options)


def test_every_request_gets_its_own_row_of_the_output() -> None:
    model = RecordingModel()
    with processor(model) as bp:
        futures = [bp.submit(tag(i)) for i in range(200)]
        assert [f.result(10) for f in futures] == [torch.tensor(10.0 * i) for i in range(200)]
    assert sorted(model.seen) == list(range(200))  # each exactly once


def test_nested_outputs_are_split_per_request() -> None:
    def model(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch["x"].sum(1), {"twice": batch["x"] * 2, "id": batch["id"]}

    with processor(model) as bp:
        futures = bp.submit_many([{"x": tag(i, 3), "id": i} for i in range(50)])
        for i, future in enumerate(futures):
            total, extra = future.result(10)
            assert total.item() == 3.0 * i
            assert torch.equal(extra["twice"], tag(2 * i, 3)) and extra["id"].item() == i


def test_future_interface() -> None:
    model = RecordingModel()
    with processor(model) as bp:
        model.hold()
        future = bp.submit(tag(1))
        assert isinstance(future, cf.Future)
        assert not future.done()
        with pytest.raises(cf.TimeoutError):
            future.result(timeout=0.01)
        called: list[cf.Future[Any]] = []
        future.add_done_callback(called.append)
        model.release()
        assert future.result(10).item() == 10.0
        assert future.exception() is None and future.done() and not future.cancelled()
        assert called == [future]
        late_callback: list[cf.Future[Any]] = []
        future.add_done_callback(late_callback.append)  # done already: runs at once
        assert late_callback == [future]
        futures = bp.submit_many([tag(i) for i in range(20)])
        done, not_done = cf.wait(futures, timeout=10)
        assert len(done) == 20 and not not_done
        assert sorted(f.result().item() for f in cf.as_completed(futures, timeout=10)) == [
            10.0 * i for i in range(20)
        ]

        async def wrapped() -> Any:
            return await asyncio.wrap_future(bp.submit(tag(7)))

        assert asyncio.run(wrapped()).item() == 70.0


def test_a_request_past_its_timeout_never_reaches_the_model() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=4) as bp:
        model.hold()
        running = bp.submit(tag(0), timeout=0.05)  # dispatched at once, then held
        assert model.entered.wait(10)
        late = [bp.submit(tag(i), timeout=0.02) for i in range(1, 6)]
        patient = bp.submit(tag(9))
        time.sleep(0.1)
        model.release()
        assert running.result(10).item() == 0.0  # already running when its timeout passed
        for future in late:
            with pytest.raises(ds.RequestTimeout, match=r"request \d+ timed out"):
                future.result(10)
            assert isinstance(future.exception(), TimeoutError)
        assert patient.result(10).item() == 90.0
        assert model.seen == [0, 9]
        stats = bp.stats()
    assert stats.timeouts == 5 and stats.priorities[0]["timeouts"] == 5


def test_cancelled_requests_are_dropped_from_their_batch() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=8) as bp:
        model.hold()
        first = bp.submit(tag(0))
        assert model.entered.wait(10)
        waiting = bp.submit_many([tag(i) for i in range(1, 9)])
        cancelled = waiting[::2]
        assert all(f.cancel() for f in cancelled)
        assert all(f.cancelled() and f.done() for f in cancelled)
        assert not first.cancel()  # running: too late
        model.release()
        for future in waiting[1::2]:
            assert future.result(10).item() == 10.0 * int(future.result().item() / 10)
        for future in cancelled:
            with pytest.raises(cf.CancelledError):
                future.result(1)
        assert first.result(10).item() == 0.0
        assert sorted(model.seen) == [0, 2, 4, 6, 8]
        assert wait_until(lambda: bp.stats().cancellations == 4)


def test_cancelling_everything_never_hangs() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=8) as bp:
        futures = bp.submit_many([tag(i) for i in range(500)])
        for future in futures:
            future.cancel()
        assert bp.submit(tag(1000)).result(10).item() == 10000.0
    assert all(f.done() for f in futures)


def test_higher_priority_runs_first() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=2) as bp:
        model.hold()
        bp.submit(tag(0))
        assert model.entered.wait(10)
        low = [bp.submit(tag(i), priority=0) for i in range(1, 5)]
        high = [bp.submit(tag(i), priority=7) for i in range(5, 9)]
        model.release()
        for future in low + high:
            future.result(10)
    order = model.seen
    # The batch formed while the first ran may be low; after it every high one comes first.
    assert set(order[-4:]) == {1, 2, 3, 4} or set(order[-2:]) <= {1, 2, 3, 4}
    positions = {t: order.index(t) for t in order}
    assert max(positions[t] for t in range(5, 9)) < max(positions[t] for t in range(1, 5))


def test_low_priority_is_not_starved_by_a_saturating_stream() -> None:
    model = RecordingModel(delay_s=0.002)
    stop = threading.Event()
    with processor(model, max_batch_size=4, priority_aging_ms=20.0) as bp:

        def flood() -> None:
            while not stop.is_set():
                futures = bp.submit_many([tag(1) for _ in range(8)], priority=100)
                futures[-1].result(10)

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            assert wait_until(lambda: len(model.calls) > 5)
            low = [bp.submit(tag(2), priority=0) for _ in range(3)]
            # 100 levels at one per 20 ms: about 2 s of aging, well within the bound.
            assert [f.result(20).item() for f in low] == [20.0] * 3
        finally:
            stop.set()
            for thread in threads:
                thread.join()


def test_model_errors_are_isolated_to_the_requests_that_cause_them() -> None:
    model = RecordingModel(poison={13, 21})
    with processor(model, max_batch_size=16) as bp:
        model.hold()
        bp.submit(tag(100))
        assert model.entered.wait(10)
        futures = bp.submit_many([tag(i) for i in range(32)])
        model.release()
        for i, future in enumerate(futures):
            if i in (13, 21):
                error = future.exception(10)
                assert isinstance(error, ValueError) and str(i) in str(error)
            else:
                assert future.result(10).item() == 10.0 * i
        stats = bp.stats()
    assert stats.isolated_errors == 2 and stats.priorities[0]["isolated_errors"] == 2
    # Every good request succeeded in exactly one call.
    succeeded = [t for call in model.calls if not {13, 21} & set(call) for t in call]
    assert sorted(succeeded) == sorted([100, *(i for i in range(32) if i not in (13, 21))])


def test_without_isolation_the_whole_batch_fails_with_the_same_error() -> None:
    model = RecordingModel(poison={3})
    with processor(model, max_batch_size=8, min_batch_size=8, isolate_errors=False) as bp:
        model.hold()
        bp.submit(tag(100))
        assert model.entered.wait(10)
        futures = bp.submit_many([tag(i) for i in range(8)])
        model.release()
        errors = {id(f.exception(10)) for f in futures}
    assert len(errors) == 1 and isinstance(futures[0].exception(), ValueError)


def test_out_of_memory_splits_the_batch_and_retries() -> None:
    class Oom(Exception):
        pass

    calls: list[int] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(batch) > 3:
            raise Oom("too big")
        return batch[:, 0]

    with processor(model, max_batch_size=16, min_batch_size=16, oom_errors=(Oom,)) as bp:
        futures = bp.submit_many([tag(i) for i in range(16)])
        assert [f.result(10).item() for f in futures] == [float(i) for i in range(16)]
        stats = bp.stats()
    assert stats.ooms >= 1 and stats.split_batches >= 1
    assert sum(n for n in calls if n <= 3) == 16  # each sample computed once


def test_model_output_with_wrong_rows_fails_the_batch_clearly() -> None:
    with processor(lambda batch: batch[:1], max_batch_size=4, min_batch_size=4) as bp:
        futures = bp.submit_many([tag(i) for i in range(4)])
        for future in futures:
            with pytest.raises(ValueError, match="1 rows for a batch of 4"):
                future.result(10)


def fill_until_refused(bp: ds.DynamicBatchProcessor, limit: int) -> list[cf.Future[Any]]:
    """Submits until the queue refuses and stays full. Requests formed into a batch ahead of
    the (held) model no longer count as waiting, so a few more than max_queue_size fit."""
    accepted: list[cf.Future[Any]] = []
    while True:
        with pytest.raises(ds.QueueFull, match=r"requests are already waiting") as refused:
            for i in range(limit):
                accepted.append(bp.submit(tag(i)))
        assert "max_queue_size" in str(refused.value)
        time.sleep(0.03)  # let the former take what it can ahead of the model
        if bp.stats().queued == bp._server._max_queue_size:  # type: ignore[union-attr]
            return accepted


def test_queue_full_raises_at_once_or_after_block_timeout() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=2, max_queue_size=4) as bp:
        model.hold()
        bp.submit(tag(0))
        assert model.entered.wait(10)
        queued = fill_until_refused(bp, 100)
        assert 4 <= len(queued) <= 4 + 2  # the queue, plus one batch formed ahead
        spill = bp.submit_many([tag(i) for i in range(6, 9)])
        assert all(isinstance(f.exception(1), ds.QueueFull) for f in spill)
        model.release()
        for future in queued:
            future.result(10)
    model.hold()
    with processor(model, max_batch_size=2, max_queue_size=2) as bp:
        bp.submit(tag(0))
        assert model.entered.wait(10)
        fill_until_refused(bp, 100)
        bp._server._block_timeout_ns = int(0.1e9)  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(ds.QueueFull, match=r"after waiting 0\.1 s"):
            bp.submit(tag(3))
        assert time.monotonic() - started >= 0.09
        model.release()


def test_block_timeout_waits_for_room() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=2, max_queue_size=2, block_timeout=10.0) as bp:
        model.hold()
        bp.submit(tag(0))
        assert model.entered.wait(10)
        while bp.stats().queued < 2:
            bp.submit(tag(1))
        threading.Timer(0.05, model.release).start()
        assert bp.submit(tag(3)).result(10).item() == 30.0


def test_close_with_drain_finishes_everything_queued() -> None:
    model = RecordingModel(delay_s=0.005)
    bp = processor(model, max_batch_size=4)
    futures = bp.submit_many([tag(i) for i in range(100)])
    bp.close(drain=True)
    assert [f.result(0).item() for f in futures] == [10.0 * i for i in range(100)]
    with pytest.raises(ds.ProcessorClosed):
        bp.submit(tag(1))
    bp.close()  # idempotent


def test_close_without_drain_fails_every_pending_request() -> None:
    model = RecordingModel()
    bp = processor(model, max_batch_size=4)
    model.hold()
    running = bp.submit(tag(0))
    assert model.entered.wait(10)
    pending = bp.submit_many([tag(i) for i in range(1, 50)])
    threading.Timer(0.05, model.release).start()
    bp.close(drain=False)
    # close() does not wait for the model: the batch in it is abandoned (tests/test_prompt_close)
    with pytest.raises(ds.ProcessorClosed, match="abandoned"):
        running.result(0)
    for future in pending:
        with pytest.raises(ds.ProcessorClosed, match="closed before this request ran"):
            future.result(0)
    assert wait_until(lambda: model.seen == [0])


def test_interpreter_exit_with_a_live_processor_neither_hangs_nor_crashes() -> None:
    script = (
        "import torch, dynbatch as ds\n"
        "bp = ds.DynamicBatchProcessor(model=lambda b: b * 2, max_delay_ms=50.0)\n"
        "futures = bp.submit_many([torch.ones(3) for _ in range(1000)])\n"
        "print(futures[0].result(10).sum().item())\n"
        "futures = bp.submit_many([torch.ones(3) for _ in range(1000)])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6.0"


def test_bad_requests_are_refused_at_submit_naming_the_request() -> None:
    with processor(lambda b: b) as bp:
        assert bp.submit(torch.zeros(4)).result(10).shape == (4,)
        with pytest.raises(ds.InvalidSampleError, match=r"request \d+: shape \(5,\) differs"):
            bp.submit(torch.zeros(5))
        with pytest.raises(ds.UnsupportedLeafError, match="request"):
            bp.submit("text")
        with pytest.raises(TypeError, match="priority must be an int"):
            bp.submit(torch.zeros(4), priority=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="priority must fit in 32 bits"):
            bp.submit(torch.zeros(4), priority=2**40)
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            bp.submit(torch.zeros(4), timeout=-1)
        with pytest.raises(ds.InvalidSampleError):
            bp.submit_many([torch.zeros(4), torch.zeros(3)])  # nothing of it is queued
        assert bp.submit(torch.ones(4)).result(10).sum().item() == 4.0
    with pytest.raises(RuntimeError, match="need a model"):
        ds.DynamicBatchProcessor().submit(torch.zeros(1))
    with pytest.raises(TypeError, match="model must be callable"):
        ds.DynamicBatchProcessor(model=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_delay_ms"):
        ds.DynamicBatchProcessor(model=len, max_delay_ms=-1)
    with pytest.raises(ValueError, match="max_queue_size"):
        ds.DynamicBatchProcessor(model=len, max_queue_size=0)


def test_stats_say_why_batches_were_released() -> None:
    model = RecordingModel()
    with processor(model, max_batch_size=8, min_batch_size=8, max_delay_ms=5.0) as bp:
        bp.submit_many([tag(i) for i in range(16)])[-1].result(10)  # two full batches
        bp.submit(tag(1)).result(10)  # alone: after max_delay
        bp.submit(tag(2), timeout=0.5, priority=3)  # drained at close, or by max_delay
        stats = bp.stats()
    assert stats.released_by["full"] >= 1 and stats.released_by["max_delay"] >= 1
    assert stats.histogram.get(8, 0) >= 1
    entry = stats.priorities[0]
    assert entry["dispatched"] == 17
    assert 0 < entry["queue_wait_p50_ms"] <= entry["queue_wait_p99_ms"]
    assert "batches released by" in str(stats) and "priority 0" in str(stats)


def test_serving_example_runs() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "serving.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "800 classifications, 500 embeddings" in result.stdout
    assert "timed out as asked" in result.stdout
