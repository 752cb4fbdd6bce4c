"""Group "overlap-<n>x<shape>": a pass over a dataset of images with a CPU model whose time
per batch is comparable to collating it; peer: ``DataLoader(dataset, batch_size=32,
collate_fn=default_collate)`` (the main-process loader: it collates, then the model runs).

dynbatch runs the same fixed batch of 32 (``min_batch_size=max_batch_size=32``), so the only
difference is where collation happens: on the core's thread, while the model computes the
previous batch. The model squares and sums each image, which takes about as long as
collating the batch; it runs on torch's default thread count and again on one thread (the
second core then stays free for the core's copy). Every output row is checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import dynbatch as ds

BATCH = 32


def model(batch: torch.Tensor) -> torch.Tensor:
    return (batch * batch).sum((1, 2, 3))


def _dataset(count: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("threads", sorted({1, torch.get_num_threads()}), indirect=True)
@pytest.mark.parametrize("impl", ["DataLoader", "dynbatch"])
def test_overlap(
    impl: str, threads: int, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    shape = (3, 96, 96) if bench_size.name == "full" else (3, 16, 16)
    count = 640 if bench_size.name == "full" else 64
    benchmark.group = f"overlap-{count}x{'x'.join(map(str, shape))}"
    dataset = _dataset(count, shape)
    processor = ds.DynamicBatchProcessor(max_batch_size=BATCH, min_batch_size=BATCH)

    @torch.no_grad()
    def run() -> list[torch.Tensor]:
        outputs = []
        batches = (
            DataLoader(dataset, batch_size=BATCH, collate_fn=default_collate)
            if impl == "DataLoader"
            else processor(dataset)
        )
        for batch in batches:
            outputs.append(model(batch))
        return outputs

    outputs = torch.cat(measure(run))
    with torch.no_grad():
        expected = torch.cat(
            [model(torch.stack(dataset[i : i + BATCH])) for i in range(0, count, BATCH)]
        )
    torch.testing.assert_close(outputs, expected)
    processor.close()
