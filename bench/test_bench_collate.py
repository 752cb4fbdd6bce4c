"""Groups "collate-<batch>x<sample shape>" (float32): ``ds.collate`` against ``torch.stack``.

Entries per group, each at one intra-op thread and at torch's default count:
- ``torch.stack``: the peer, a fresh output per call (for a 38 MB batch, mostly page faults);
- ``default_collate``: ``torch.utils.data.default_collate`` (``torch.stack`` plus dispatch);
- ``torch.stack-out``: stacking into one preallocated buffer, the page-fault-free reference;
- ``ds.collate``: the core, one memcpy per sample into a pooled 4 KiB-aligned slot.

Each call's result is dropped inside the timed function, as a training loop drops the
previous batch, so ``ds.collate`` reuses its slot and ``torch.stack`` frees its output.
The core copies on one thread whatever ``torch.set_num_threads`` says.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import default_collate

import dynbatch as ds

_DEFAULT_THREADS = torch.get_num_threads()
THREADS = sorted({1, _DEFAULT_THREADS})
IMPLS = ["torch.stack", "default_collate", "torch.stack-out", "ds.collate"]


def _sample_shape(case: str, size: Any) -> tuple[int, ...]:
    return (size.flat_features,) if case == "flat" else size.image_shape


def _pool_stats() -> dict[str, int] | None:
    """The shared pool's counters (private; None if the layout of the package changed)."""
    pool = getattr(sys.modules.get("dynbatch.collate"), "_pool", None)
    return pool.stats() if pool is not None else None


_samples_cache: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}


def _samples(batch: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """One separately allocated tensor per sample, as a dataset hands them out."""
    key = (batch, shape)
    if key not in _samples_cache:
        generator = torch.Generator().manual_seed(0)
        _samples_cache.clear()  # keep one set (38 MB at full size) alive at a time
        _samples_cache[key] = [
            torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(batch)
        ]
    return _samples_cache[key]


def _runner(impl: str, samples: list[torch.Tensor]) -> Callable[[], None]:
    if impl == "torch.stack":

        def run() -> None:
            torch.stack(samples)

    elif impl == "default_collate":

        def run() -> None:
            default_collate(samples)

    elif impl == "torch.stack-out":
        out = torch.empty((len(samples), *samples[0].shape), dtype=samples[0].dtype)

        def run() -> None:
            torch.stack(samples, out=out)

    elif impl == "ds.collate":

        def run() -> None:
            ds.collate(samples)

    else:
        raise AssertionError(impl)
    return run


def _result(impl: str, samples: list[torch.Tensor]) -> torch.Tensor:
    """What ``impl`` produces, for checking (the timed runner drops it)."""
    if impl == "torch.stack-out":
        out = torch.empty((len(samples), *samples[0].shape), dtype=samples[0].dtype)
        return torch.stack(samples, out=out)
    if impl == "default_collate":
        return default_collate(samples)  # type: ignore[no-any-return]
    if impl == "ds.collate":
        return ds.collate(samples)  # type: ignore[no-any-return]
    return torch.stack(samples)


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["flat", "image"])
def test_collate(
    case: str,
    impl: str,
    threads: int,
    bench_size: Any,
    benchmark: Any,
    measure: Callable[..., Any],
) -> None:
    shape = _sample_shape(case, bench_size)
    batch = bench_size.collate_batch
    benchmark.group = "collate-" + "x".join(str(d) for d in (batch, *shape))
    samples = _samples(batch, shape)
    expected = torch.stack(samples)

    # Checked once before timing: this also warms the pool slot / the out= buffer.
    result = _result(impl, samples)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)
    del result

    run = _runner(impl, samples)
    stats_before = _pool_stats() if impl == "ds.collate" else None
    measure(run)

    # The slot reused across rounds still produces the right batch.
    result = _result(impl, samples)
    assert torch.equal(result, expected)
    if stats_before is not None:
        stats_after = _pool_stats()
        assert stats_after is not None
        # Dropping each result returned its slot: the timed rounds allocated nothing new.
        assert stats_after["one_off_allocations"] == stats_before["one_off_allocations"]
        assert stats_after["slot_growths"] == stats_before["slot_growths"]
