"""Group "pad-<batch>x<width>": padding variable-length samples (issue 5); peer:
``torch.nn.utils.rnn.pad_sequence(batch_first=True)``.

64 sequences of random length 16..512 (seeded), two cases: token ids (int64, 1-D) and
feature rows (float32, 64 features per step). Entries: ``pad_sequence`` (a fresh output per
call) and ``ds.collate(samples, pad_value=0)`` (one copy into a pooled slot plus the pad
fill, returning a ``PaddedBatch`` with lengths and mask). Each result is dropped inside the
timed call, as a loop drops the previous batch. Outputs are checked equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

import dynbatch as ds

BATCH = 64


def _sequences(width: int, tiny: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    high = 64 if tiny else 512
    lengths = torch.randint(16, high + 1, (BATCH,), generator=generator).tolist()
    if width == 0:
        return [torch.randint(0, 30000, (n,), generator=generator) for n in lengths]
    return [torch.randn(n, width, generator=generator) for n in lengths]


@pytest.mark.parametrize("width", [0, 64])
@pytest.mark.parametrize("impl", ["pad_sequence", "ds.collate-pad"])
def test_pad(
    impl: str, width: int, measure: Callable[..., Any], bench_size: Any, benchmark: Any
) -> None:
    benchmark.group = f"pad-{BATCH}x{'tokens' if width == 0 else f'{width}-features'}"
    samples = _sequences(width, bench_size.name == "tiny")
    expected = pad_sequence(samples, batch_first=True)
    if impl == "pad_sequence":

        def run() -> Any:
            return pad_sequence(samples, batch_first=True).shape

        measure(run)
    else:

        def run() -> Any:
            return ds.collate(samples, pad_value=0).data.shape

        measure(run)
        assert torch.equal(ds.collate(samples, pad_value=0).data, expected)
