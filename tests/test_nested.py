"""Nested processors: a model that waits for another processor's results (a pipeline, an
embedder inside a reranker) runs whether both use the device's shared scheduler (the outer
model lends its grant while it waits) or schedulers of their own, at any depth. A wait that
could never end fails at once. Every wait here has a timeout: a deadlock is a red test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dynbatch as ds

from .serving_models import tag

WAIT_S = 5.0  # far beyond what any of these takes; reached only by a deadlock
# Outer processors: a failed batch fails once (no bisection into more waits of WAIT_S).
OUTER: dict[str, Any] = {"max_batch_size": 4, "isolate_errors": False}


def doubling(batch: torch.Tensor) -> torch.Tensor:
    return batch * 2


def through(inner: ds.DynamicBatchProcessor, wait: str) -> Callable[[torch.Tensor], Any]:
    """An outer model: sends each sample of its batch to ``inner`` and waits (as ``wait``
    says) for the results, then adds one."""

    def model(batch: torch.Tensor) -> torch.Tensor:
        samples = list(batch)
        if wait == "infer":

            async def all_of() -> list[torch.Tensor]:
                every = asyncio.gather(*(inner.infer(s) for s in samples))
                return list(await asyncio.wait_for(every, WAIT_S))

            return torch.stack(asyncio.run(all_of())) + 1
        futures = inner.submit_many(samples)
        if wait == "result":
            rows = [future.result(WAIT_S) for future in futures]
        elif wait == "exception":
            assert all(future.exception(WAIT_S) is None for future in futures)
            rows = [future.result(0) for future in futures]
        elif wait == "wait":
            assert not concurrent.futures.wait(futures, WAIT_S).not_done
            rows = [future.result(0) for future in futures]
        else:
            assert wait == "as_completed"
            finished = list(concurrent.futures.as_completed(futures, WAIT_S))
            assert len(finished) == len(futures)
            rows = [future.result(0) for future in futures]
        return torch.stack(rows) + 1

    return model


def check_results(outer: ds.DynamicBatchProcessor, expected: Callable[[int], float]) -> None:
    futures = outer.submit_many([tag(i) for i in range(12)])
    results = [future.result(3 * WAIT_S) for future in futures]
    assert [float(r[0]) for r in results] == [expected(i) for i in range(12)]


@pytest.mark.parametrize("wait", ["result", "exception", "wait", "as_completed", "infer"])
def test_a_model_waiting_on_a_processor_of_the_same_shared_scheduler(wait: str) -> None:
    # Both use Scheduler.shared(): one batch at a time on the device.
    with (
        ds.DynamicBatchProcessor(model=doubling, max_batch_size=4) as inner,
        ds.DynamicBatchProcessor(model=through(inner, wait), **OUTER) as outer,
    ):
        check_results(outer, lambda i: 2 * i + 1)
    state = ds.Scheduler.shared("cpu").state()
    assert state["running"] == 0  # every lent grant was taken back and released once


def test_the_outer_model_holds_its_grant_again_after_the_wait() -> None:
    scheduler = ds.Scheduler("cpu")
    running_seen: list[tuple[str, int]] = []

    def inner_model(batch: torch.Tensor) -> torch.Tensor:
        running_seen.append(("inner", scheduler.state()["running"]))
        return batch * 2

    with ds.DynamicBatchProcessor(model=inner_model, scheduler=scheduler) as inner:

        def outer_model(batch: torch.Tensor) -> torch.Tensor:
            running_seen.append(("outer before", scheduler.state()["running"]))
            rows = [future.result(WAIT_S) for future in inner.submit_many(list(batch))]
            running_seen.append(("outer after", scheduler.state()["running"]))
            return torch.stack(rows)

        with ds.DynamicBatchProcessor(model=outer_model, scheduler=scheduler, **OUTER) as outer:
            assert float(outer.submit(tag(3)).result(WAIT_S)[0]) == 6.0
    # One batch at a time throughout: the inner one ran while the outer grant was lent.
    assert running_seen[0] == ("outer before", 1)
    assert ("inner", 1) in running_seen
    assert running_seen[-1] == ("outer after", 1)
    assert scheduler.state()["running"] == 0
    scheduler.close()


def test_a_model_waiting_on_a_processor_of_another_scheduler() -> None:
    outer_scheduler, inner_scheduler = ds.Scheduler("cpu"), ds.Scheduler("cpu")
    with ds.DynamicBatchProcessor(model=doubling, scheduler=inner_scheduler) as inner:
        outer_model = through(inner, "result")
        with ds.DynamicBatchProcessor(
            model=outer_model, scheduler=outer_scheduler, **OUTER
        ) as outer:
            check_results(outer, lambda i: 2 * i + 1)
    assert outer_scheduler.state()["running"] == inner_scheduler.state()["running"] == 0
    outer_scheduler.close()
    inner_scheduler.close()


def test_three_processors_nested_on_the_shared_scheduler() -> None:
    # c's model waits on a, whose model waits on b: two grants lent at once, on two threads.
    with (
        ds.DynamicBatchProcessor(model=doubling, max_batch_size=4) as b,
        ds.DynamicBatchProcessor(model=through(b, "result"), **OUTER) as a,
        ds.DynamicBatchProcessor(model=through(a, "wait"), **OUTER) as c,
    ):
        check_results(c, lambda i: (2 * i + 1) + 1)
    assert ds.Scheduler.shared("cpu").state()["running"] == 0


def test_a_model_waiting_on_its_own_processor_fails_at_once() -> None:
    own: list[ds.DynamicBatchProcessor] = []

    def model(batch: torch.Tensor) -> torch.Tensor:
        if float(batch[0, 0]) == 1.0:  # the outer request asks its own processor
            return own[0].submit(tag(2)).result(WAIT_S)[None, :]
        return batch

    with ds.DynamicBatchProcessor(model=model, max_batch_size=1) as processor:
        own.append(processor)
        with pytest.raises(RuntimeError, match="its own processor"):
            processor.submit(tag(1)).result(WAIT_S)


def test_a_second_grant_of_a_one_batch_scheduler_on_the_same_thread_fails_at_once() -> None:
    scheduler = ds.Scheduler("cpu")
    task = ds.Scheduler.new_task_id()

    def model(batch: torch.Tensor) -> torch.Tensor:
        # The model's own work under a grant of its scheduler (giving up after WAIT_S).
        deadline = time.monotonic() + WAIT_S
        scheduler.acquire(task, 0, 0, give_up=lambda: time.monotonic() > deadline)
        return batch

    with (
        ds.DynamicBatchProcessor(model=model, scheduler=scheduler) as processor,
        pytest.raises(RuntimeError, match=r"Scheduler\(device='cpu'.*only grant"),
    ):
        processor.submit(tag(1)).result(WAIT_S)
    assert scheduler.state()["running"] == 0
    scheduler.close()
