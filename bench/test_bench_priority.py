"""Group "priority-backlog": two tasks with a backlog each on one ``Scheduler`` (issue 11,
"priorities mean priority"). Each round the low-priority task has a standing backlog and the
high-priority one gets ``HIGH_BATCHES`` batches; both models take about 2 ms a batch. Timed:
the round, until the high task's last result (lower is better). ``extra_info``: the low task's
grants between the high task's first batch and its last (``low_grants``, summed over rounds)
and the high task's grants (``high_grants``), so the share is exact.

- ``holds``: the default scheduler; the high task keeps the device between its batches.
- ``no-holds`` (the peer): ``max_hold_ms=0``, the behaviour before holds, where the low task
  takes the device whenever the high one's worker is finishing a batch and has not asked yet.

``python bench/report.py`` prints the grant shares next to the time ratio.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import dynbatch as ds

HIGH_BATCHES = 40
BATCH = 4


def one_round(max_hold_ms: float, high_batches: int, counts: dict[str, int]) -> None:
    scheduler = ds.Scheduler("cpu", aging_ms=100_000.0, max_hold_ms=max_hold_ms)
    low_task: list[int] = []
    seen: list[int] = []  # the low task's grants, read by each high batch

    def low_model(batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)
        return batch[:, 0]

    def high_model(batch: torch.Tensor) -> torch.Tensor:
        seen.append(scheduler.state()["grants_by_task"][low_task[0]])
        time.sleep(0.002)
        return batch[:, 0]

    common: dict[str, Any] = {
        "scheduler": scheduler,
        "min_batch_size": BATCH,
        "max_batch_size": BATCH,
        "max_queue_size": 4096,
    }
    with (
        ds.DynamicBatchProcessor(model=low_model, **common) as low,
        ds.DynamicBatchProcessor(model=high_model, task_priority=5, **common) as high,
    ):
        low_futures = low.submit_many([torch.ones(8) for _ in range(BATCH * 1000)])
        while scheduler.state()["grants"] < 2:
            time.sleep(0.001)
        low_task.extend(scheduler.state()["grants_by_task"])
        for future in high.submit_many([torch.ones(8) for _ in range(BATCH * high_batches)]):
            future.result(60)
        for future in low_futures:
            future.cancel()
    scheduler.close()
    assert len(seen) >= high_batches
    counts["low_grants"] += seen[-1] - seen[0]
    counts["high_grants"] += high_batches
    counts["rounds"] += 1


@pytest.mark.parametrize("impl", ["holds", "no-holds"])
def test_priority_backlog(benchmark: Any, measure: Any, bench_size: Any, impl: str) -> None:
    benchmark.group = "priority-backlog"
    high_batches = HIGH_BATCHES if bench_size.name == "full" else 10
    counts = {"low_grants": 0, "high_grants": 0, "rounds": 0}
    measure(one_round, 50.0 if impl == "holds" else 0.0, high_batches, counts)
    benchmark.extra_info.update(counts)
    benchmark.extra_info["bench_size"] = bench_size.name
