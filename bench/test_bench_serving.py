"""Groups "serve-*": per-request overhead of serving with an identity model; peer: the plain
Python batcher (queue.Queue + worker thread + concurrent.futures), next to ``batched``.

Each round sends N requests of one (16,) float32 sample and waits for every result, so the
time per request is what batching itself costs (the model returns its input):

- ``serve-threads-1`` / ``serve-threads-4``: 1 or 4 submitting threads, one call per request
  (dynbatch ``submit``; the plain batcher's ``submit``; ``batched``'s ``_schedule``).
- ``serve-bulk``: one thread, chunks of 256 (dynbatch ``submit_many``; the plain batcher's
  loop of puts; ``batched``'s list call, which waits for each chunk).
- ``serve-async``: N asyncio tasks (dynbatch ``infer``; ``asyncio.wrap_future`` of the plain
  batcher; ``batched.aio``).

Every implementation: largest batch 256, longest wait 1 ms. Results are checked each round.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from serving_peers import PlainBatcher, batched_available, batched_function

import dynbatch as ds

MAX_BATCH = 256
DELAY_MS = 1.0
CHUNK = 256


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch


def requests(count: int) -> list[torch.Tensor]:
    return [torch.full((16,), float(i)) for i in range(count)]


def check(samples: list[torch.Tensor], results: list[Any]) -> None:
    assert len(results) == len(samples)
    for i in (0, len(samples) // 2, len(samples) - 1):
        assert torch.equal(results[i], samples[i])


def threaded(
    samples: list[torch.Tensor], threads: int, send: Callable[[torch.Tensor], Any]
) -> list[Any]:
    """Each thread submits its contiguous share, then waits for its results."""
    share = -(-len(samples) // threads)
    results: list[Any] = [None] * len(samples)

    def work(start: int) -> None:
        futures = [send(sample) for sample in samples[start : start + share]]
        for offset, future in enumerate(futures):
            results[start + offset] = future.result()

    workers = [threading.Thread(target=work, args=(s,)) for s in range(0, len(samples), share)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


IMPLS = ["plain-batcher", "dynbatch", "batched"]


def _open(impl: str) -> tuple[Any, Callable[[], None]]:
    if impl == "dynbatch":
        bp = ds.DynamicBatchProcessor(
            model=identity, max_batch_size=MAX_BATCH, max_delay_ms=DELAY_MS
        )
        return bp, bp.close
    if impl == "plain-batcher":
        plain = PlainBatcher(identity, MAX_BATCH, DELAY_MS)
        return plain, plain.close
    if not batched_available():
        pytest.skip("the batched package is not installed (pip install batched)")
    import batched

    processor = batched.BatchProcessor(
        batched_function(identity), batch_size=MAX_BATCH, timeout_ms=DELAY_MS
    )
    return processor, processor.shutdown


def _sender(impl: str, server: Any) -> Callable[[torch.Tensor], Any]:
    if impl == "batched":
        return lambda sample: server._schedule([sample])[0].future
    return server.submit  # type: ignore[no-any-return]


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_serve_threads(
    impl: str, threads: int, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    benchmark.group = f"serve-threads-{threads}"
    samples = requests(20_000 if bench_size.name == "full" else 1_000)
    benchmark.extra_info["requests"] = len(samples)
    server, close = _open(impl)
    try:
        send = _sender(impl, server)
        check(samples, measure(threaded, samples, threads, send))
    finally:
        close()


@pytest.mark.parametrize("impl", IMPLS)
def test_serve_bulk(
    impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    benchmark.group = "serve-bulk"
    samples = requests(20_000 if bench_size.name == "full" else 1_000)
    benchmark.extra_info["requests"] = len(samples)
    server, close = _open(impl)

    def run() -> list[Any]:
        if impl == "batched":  # its list call returns the results of the chunk
            return [
                r for i in range(0, len(samples), CHUNK) for r in server(samples[i : i + CHUNK])
            ]
        futures = [
            f
            for i in range(0, len(samples), CHUNK)
            for f in server.submit_many(samples[i : i + CHUNK])
        ]
        return [f.result() for f in futures]

    try:
        check(samples, measure(run))
    finally:
        close()


@pytest.mark.parametrize("impl", IMPLS)
def test_serve_async(
    impl: str, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    benchmark.group = "serve-async"
    samples = requests(20_000 if bench_size.name == "full" else 1_000)
    benchmark.extra_info["requests"] = len(samples)
    close: Callable[[], None] = lambda: None  # noqa: E731
    if impl == "batched":
        if not batched_available():
            pytest.skip("the batched package is not installed (pip install batched)")
        from batched.aio import AsyncBatchProcessor

        def make_call() -> Callable[[torch.Tensor], Any]:
            # It binds to the loop that first uses it: one per round, as each round is a loop.
            return AsyncBatchProcessor(  # type: ignore[no-any-return]
                batched_function(identity), batch_size=MAX_BATCH, timeout_ms=DELAY_MS
            )
    else:
        server, close = _open(impl)

        def make_call() -> Callable[[torch.Tensor], Any]:
            if impl == "dynbatch":
                return server.infer  # type: ignore[no-any-return]
            return lambda sample: asyncio.wrap_future(server.submit(sample))

    async def gather() -> list[Any]:
        call = make_call()
        return list(await asyncio.gather(*(call(sample) for sample in samples)))

    try:
        check(samples, measure(lambda: asyncio.run(gather())))
    finally:
        close()
