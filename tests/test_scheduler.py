"""Scheduler: several processors (tasks) on one device, by task priority with aging, and
concurrent batches only while their learned memory reservations fit together."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import dynbatch as ds

from .serving_models import RecordingModel, tag, wait_until


class FixedPeak:
    """A memory monitor reporting the same peak for every batch (a device we pretend to have)."""

    def __init__(self, peak_bytes: int) -> None:
        self.peak_bytes = peak_bytes

    def begin(self) -> None:
        return None

    def end(self) -> tuple[int, int]:
        return (self.peak_bytes, 0)


class OverlapProbe:
    """Models that sleep and record how many of them ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0

    def model(self, seconds: float) -> Any:
        def run(batch: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.active += 1
                self.most = max(self.most, self.active)
            time.sleep(seconds)
            with self.lock:
                self.active -= 1
            return batch[:, 0]

        return run


def test_waiting_batches_run_by_task_priority() -> None:
    scheduler = ds.Scheduler("cpu")
    order: list[str] = []
    blocker = RecordingModel()

    def named(name: str) -> Any:
        def run(batch: torch.Tensor) -> torch.Tensor:
            order.append(name)
            return batch[:, 0]

        return run

    common: dict[str, Any] = {"scheduler": scheduler, "max_batch_size": 4, "max_delay_ms": 1.0}
    with (
        ds.DynamicBatchProcessor(model=blocker, **common) as first,
        ds.DynamicBatchProcessor(model=named("low"), task_priority=0, **common) as low,
        ds.DynamicBatchProcessor(model=named("high"), task_priority=5, **common) as high,
    ):
        blocker.hold()
        first.submit(tag(0))
        assert blocker.entered.wait(10)
        low_future = low.submit(tag(1))
        assert wait_until(lambda: scheduler.state()["waiting"] == 1)
        high_future = high.submit(tag(2))
        assert wait_until(lambda: scheduler.state()["waiting"] == 2)
        blocker.release()
        low_future.result(10)
        high_future.result(10)
    assert order == ["high", "low"]
    scheduler.close()


def test_a_low_priority_task_is_not_starved() -> None:
    scheduler = ds.Scheduler("cpu", aging_ms=10.0)
    stop = threading.Event()
    common: dict[str, Any] = {"scheduler": scheduler, "max_batch_size": 4, "max_delay_ms": 1.0}
    with (
        ds.DynamicBatchProcessor(
            model=RecordingModel(delay_s=0.003), task_priority=50, **common
        ) as busy,
        ds.DynamicBatchProcessor(model=RecordingModel(), task_priority=0, **common) as quiet,
    ):

        def flood() -> None:
            while not stop.is_set():
                busy.submit_many([tag(1) for _ in range(8)])[-1].result(10)

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            assert wait_until(lambda: scheduler.state()["grants"] > 10)
            assert [quiet.submit(tag(3)).result(20).item() for _ in range(3)] == [30.0] * 3
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    grants = scheduler.state()["grants_by_task"]
    assert len(grants) == 2 and all(count > 0 for count in grants.values())
    scheduler.close()


@pytest.mark.parametrize("share", [0.001, 0.6])
def test_concurrent_batches_never_exceed_the_memory_budget_together(share: float) -> None:
    scheduler = ds.Scheduler("cpu", concurrency=2, memory_margin=0.0)
    available = int(scheduler._telemetry.latest()["memory_available_bytes"])
    peak = int(available * share)
    probe = OverlapProbe()
    common: dict[str, Any] = {
        "scheduler": scheduler,
        "max_batch_size": 4,
        "min_batch_size": 4,
        "max_delay_ms": 1.0,
        "memory_monitor": FixedPeak(peak),
    }
    with (
        ds.DynamicBatchProcessor(model=probe.model(0.02), **common) as a,
        ds.DynamicBatchProcessor(model=probe.model(0.02), **common) as b,
    ):
        # First batches run alone (no memory model yet); then the reservations decide.
        for _ in range(3):
            futures = a.submit_many([tag(i) for i in range(8)])
            futures += b.submit_many([tag(i) for i in range(8)])
            for future in futures:
                future.result(10)
    if share > 0.5:
        assert probe.most == 1  # two reservations of 60% never together
    else:
        assert probe.most == 2  # small ones share the device
    scheduler.close()


def test_scheduler_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        ds.Scheduler("cpu", concurrency=0)
    with pytest.raises(ValueError, match="cpu and cuda"):
        ds.Scheduler("meta")
    with pytest.raises(TypeError, match=r"scheduler must be a dynbatch\.Scheduler"):
        ds.DynamicBatchProcessor(model=len, scheduler="cpu")  # type: ignore[arg-type]
    assert ds.Scheduler.shared("cpu") is ds.Scheduler.shared("cpu")


def _low_grants_while_high_is_backlogged(max_hold_ms: float, high_batches: int) -> int:
    """Two tasks with a backlog each on one scheduler; returns the low task's grants between
    the high task's first batch and its last."""
    # Aging so slow that it never lets the low task through here: only the holds count.
    scheduler = ds.Scheduler("cpu", aging_ms=100_000.0, max_hold_ms=max_hold_ms)
    low_task: list[int] = []
    low_grants_seen: list[int] = []  # by each high batch

    def high_model(batch: torch.Tensor) -> torch.Tensor:
        low_grants_seen.append(scheduler.state()["grants_by_task"][low_task[0]])
        time.sleep(0.002)
        return batch[:, 0]

    common: dict[str, Any] = {
        "scheduler": scheduler,
        "min_batch_size": 4,
        "max_batch_size": 4,
        "max_queue_size": 4096,
    }
    with (
        ds.DynamicBatchProcessor(model=RecordingModel(delay_s=0.002), **common) as low,
        ds.DynamicBatchProcessor(model=high_model, task_priority=5, **common) as high,
    ):
        low_futures = low.submit_many([tag(1) for _ in range(4 * 1000)])
        assert wait_until(lambda: scheduler.state()["grants"] >= 2)
        low_task.extend(scheduler.state()["grants_by_task"])
        high_futures = high.submit_many([tag(2) for _ in range(4 * high_batches)])
        for future in high_futures:
            future.result(30)
        for future in low_futures:
            future.cancel()
    scheduler.close()
    assert len(low_task) == 1 and len(low_grants_seen) >= high_batches
    return low_grants_seen[-1] - low_grants_seen[0]


def test_a_backlogged_higher_task_gets_every_grant() -> None:
    """Between two of its batches the high task's worker is busy (outputs, futures, the next
    batch) and has not asked yet; it keeps the device all the same. Without holds the low task
    takes about every other grant in those gaps."""
    batches = 40
    held = _low_grants_while_high_is_backlogged(50.0, batches)
    unheld = _low_grants_while_high_is_backlogged(0.0, batches)
    # With holds: the first gap (nothing measured yet), perhaps one granted as the high task's
    # first batch started, and on a loaded machine, rarely, a gap past 4x the longest
    # recent one (the worker was not scheduled for a while): at most one gap in ten.
    assert held <= 2 + batches // 10, (held, unheld)
    assert unheld >= batches // 4, (held, unheld)


def test_max_hold_is_checked() -> None:
    with pytest.raises(ValueError, match="max_hold_ms"):
        ds.Scheduler("cpu", max_hold_ms=-1.0)
    with pytest.raises(TypeError, match="max_hold_ms"):
        ds.Scheduler("cpu", max_hold_ms="50")  # type: ignore[arg-type]
