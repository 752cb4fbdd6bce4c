"""Group "serve-load-*": open-loop Poisson arrivals on a model taking a + b*n (a sleep, as a
device would: the GIL is free meanwhile); p50/p99 latency and achieved throughput of dynbatch
next to the plain Python batcher and ``batched``.

The model takes a = 4 ms + b = 0.1 ms per sample; with batches of at most 64 its capacity is
64 / (4 + 6.4) ms = 6,154 requests/s. Loads: 50% and 90% of that (open loop: arrivals do not
wait for answers), and "burst" (every request at once: the highest throughput each reaches).
A request's latency runs from its scheduled arrival to its future's completion (a done
callback). Every implementation: largest batch 64, longest wait 2 ms. The figures are in each
benchmark's ``extra_info``; ``python bench/report.py`` prints them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from serving_peers import PlainBatcher, batched_available, batched_function

import dynbatch as ds

A_S, B_S = 4e-3, 1e-4
MAX_BATCH = 64
DELAY_MS = 2.0
CAPACITY = MAX_BATCH / (A_S + B_S * MAX_BATCH)


def device_like_model(batch: torch.Tensor) -> torch.Tensor:
    time.sleep(A_S + B_S * len(batch))
    return batch


def open_server(impl: str) -> tuple[Callable[[torch.Tensor], Any], Callable[[], None]]:
    """A submit function returning a concurrent.futures.Future, and a close function."""
    if impl == "dynbatch":
        bp = ds.DynamicBatchProcessor(
            model=device_like_model, max_batch_size=MAX_BATCH, max_delay_ms=DELAY_MS
        )
        return bp.submit, bp.close
    if impl == "plain-batcher":
        plain = PlainBatcher(device_like_model, MAX_BATCH, DELAY_MS)
        return plain.submit, plain.close
    if not batched_available():
        pytest.skip("the batched package is not installed (pip install batched)")
    import batched

    processor = batched.BatchProcessor(
        batched_function(device_like_model), batch_size=MAX_BATCH, timeout_ms=DELAY_MS
    )
    return (lambda sample: processor._schedule([sample])[0].future), processor.shutdown


def run_load(impl: str, rate: float | None, count: int, seed: int) -> dict[str, float]:
    """Sends `count` requests with Poisson arrivals at `rate` per second (None: all at once);
    returns latency percentiles (ms) and achieved throughput (requests/s)."""
    submit, close = open_server(impl)
    rng = random.Random(seed)
    samples = [torch.full((8,), float(i)) for i in range(count)]
    offsets = [0.0] * count
    if rate is not None:
        for i in range(1, count):
            offsets[i] = offsets[i - 1] + rng.expovariate(rate)
    finished = [0.0] * count
    done = threading.Semaphore(0)

    def on_done(index: int) -> Callable[[Any], None]:
        def record(_: Any) -> None:
            finished[index] = time.perf_counter()
            done.release()

        return record

    # Warm up (the sizing explores, threads start) outside the measurement.
    for future in [submit(samples[0]) for _ in range(2 * MAX_BATCH)]:
        future.result(30)
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(sample).add_done_callback(on_done(i))
    for _ in range(count):
        assert done.acquire(timeout=60), "a request never finished"
    close()
    latencies = sorted((finished[i] - (start + offsets[i])) * 1e3 for i in range(count))
    span = max(finished) - start
    return {
        "p50_ms": latencies[count // 2],
        "p99_ms": latencies[min(count - 1, int(count * 0.99))],
        "throughput": count / span,
        "offered": rate if rate is not None else 0.0,
    }


@pytest.mark.parametrize("load", ["50%", "90%", "burst"])
@pytest.mark.parametrize("impl", ["plain-batcher", "dynbatch", "batched"])
def test_serve_load(impl: str, load: str, bench_size: Any, benchmark: Any) -> None:
    benchmark.group = f"serve-load-{load}"
    rate = {"50%": 0.5 * CAPACITY, "90%": 0.9 * CAPACITY, "burst": None}[load]
    seconds = 3.0 if bench_size.name == "full" else 0.3
    count = int((rate or CAPACITY) * seconds)
    figures = benchmark.pedantic(run_load, args=(impl, rate, count, 7), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    benchmark.extra_info["requests"] = count
    assert figures["throughput"] > 0
