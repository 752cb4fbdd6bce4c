"""Group "iterate-<n>x<features>": a whole inference pass over a list of samples.

``for batch in processor(data): model(batch)`` with ``ds.DynamicBatchProcessor(max_batch_size=64,
min_batch_size=8)`` against the peer, a plain loop that stacks fixed chunks of 32 with
``torch.stack``. ``fixed-32`` is the lecture's example at a fixed size
(``min_batch_size=max_batch_size=32``), the plain loop's own size (issue 11: at least as fast
as it). The model is one small ``Linear``, so batching overhead is what shows. The processors
are made once and reused across rounds, as a serving loop would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import dynbatch as ds

PLAIN_CHUNK = 32
MAX_BATCH, MIN_BATCH = 64, 8
OUT_FEATURES = 10


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(784, OUT_FEATURES).eval()


def _data(count: int, features: int) -> list[torch.Tensor]:
    """Sample ``i`` holds ``i`` in column 0, so the batches show which samples they carry."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(count):
        sample = torch.randn(features, generator=generator)
        sample[0] = i
        samples.append(sample)
    return samples


@pytest.fixture
def processor() -> Iterator[ds.DynamicBatchProcessor]:
    with ds.DynamicBatchProcessor(max_batch_size=MAX_BATCH, min_batch_size=MIN_BATCH) as bp:
        yield bp


@pytest.fixture
def fixed_processor() -> Iterator[ds.DynamicBatchProcessor]:
    with ds.DynamicBatchProcessor(max_batch_size=PLAIN_CHUNK, min_batch_size=PLAIN_CHUNK) as bp:
        yield bp


def _plain_batches(data: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for start in range(0, len(data), PLAIN_CHUNK):
        yield torch.stack(data[start : start + PLAIN_CHUNK])


def _check_exactly_once(
    batches: Iterator[torch.Tensor], count: int, sizes: tuple[int, int]
) -> None:
    seen = []
    batch_sizes = []
    for batch in batches:
        seen.append(batch[:, 0].clone())
        batch_sizes.append(batch.shape[0])
    ids = torch.cat(seen)
    assert torch.equal(ids, torch.arange(count, dtype=ids.dtype)), "samples lost or repeated"
    low, high = sizes
    assert all(low <= n <= high for n in batch_sizes[:-1]), batch_sizes
    assert 1 <= batch_sizes[-1] <= high, batch_sizes


@pytest.mark.parametrize("impl", ["plain-loop", "DynamicBatchProcessor", "fixed-32"])
def test_iterate(
    impl: str,
    model: torch.nn.Module,
    processor: ds.DynamicBatchProcessor,
    fixed_processor: ds.DynamicBatchProcessor,
    bench_size: Any,
    benchmark: Any,
    measure: Callable[..., Any],
) -> None:
    count, features = bench_size.iterate_samples, bench_size.flat_features
    benchmark.group = f"iterate-{count}x{features}"
    data = _data(count, features)

    if impl == "plain-loop":
        make_batches: Callable[[], Iterator[torch.Tensor]] = lambda: _plain_batches(data)  # noqa: E731
        sizes = (PLAIN_CHUNK, PLAIN_CHUNK)
    elif impl == "fixed-32":
        make_batches = lambda: fixed_processor(data)  # noqa: E731
        sizes = (PLAIN_CHUNK, PLAIN_CHUNK)
    else:
        make_batches = lambda: processor(data)  # noqa: E731
        sizes = (MIN_BATCH, MAX_BATCH)

    # Checked once before timing (also starts the processor's threads and pool).
    _check_exactly_once(make_batches(), count, sizes)

    def run() -> int:
        rows = 0
        with torch.no_grad():
            for batch in make_batches():
                out = model(batch)
                rows += out.shape[0]
        return rows

    assert measure(run) == count
    _check_exactly_once(make_batches(), count, sizes)
