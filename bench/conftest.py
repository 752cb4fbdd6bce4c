"""Shared settings for the benchmarks: full or tiny sizes, and how each benchmark is run.

Run them explicitly (they are outside ``testpaths``)::

    python -m pytest bench/ --benchmark-only                   # full sizes, calibrated rounds
    python -m pytest bench/ --benchmark-only --bench-size=tiny # CI smoke run, a few seconds
    DYNBATCH_BENCH_TINY=1 python -m pytest bench/ --benchmark-only

Tiny mode shrinks the data and runs each benchmark for a fixed, small number of rounds; its
figures check that every benchmark still runs and asserts, they are not for reporting.
Every group holds its peer (``torch.stack``, ``queue.Queue``, a plain loop), so figures are
read as ratios: ``python bench/report.py`` prints them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cache_dir import profiles_in

_TINY_ROUNDS = 3


@dataclass(frozen=True)
class BenchSize:
    name: str
    collate_batch: int  # samples per collated batch
    image_shape: tuple[int, ...]  # the large-sample collate case
    flat_features: int  # the small-sample collate case, and the iterate case
    iterate_samples: int
    sizing_sim_samples: int  # samples per simulated pass (sizing-sim groups)
    sizing_cpu_samples: int  # samples per real CPU pass (sizing-cpu groups)


FULL = BenchSize(
    "full",
    collate_batch=64,
    image_shape=(3, 224, 224),
    flat_features=784,
    iterate_samples=1000,
    sizing_sim_samples=20000,
    sizing_cpu_samples=12000,
)
TINY = BenchSize(
    "tiny",
    collate_batch=8,
    image_shape=(3, 32, 32),
    flat_features=784,
    iterate_samples=200,
    sizing_sim_samples=4000,
    sizing_cpu_samples=2000,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU benchmarks (marked ``gpu``) skip without a usable CUDA GPU, as the GPU tests do."""
    import dynbatch

    if dynbatch.build_info()["gpu_usable"]:
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_addoption(parser: pytest.Parser) -> None:
    default = "tiny" if os.environ.get("DYNBATCH_BENCH_TINY", "") not in ("", "0") else "full"
    parser.addoption(
        "--bench-size",
        choices=("tiny", "full"),
        default=default,
        help="benchmark data sizes: 'full' (default) or 'tiny' for a quick smoke run "
        "(also set by DYNBATCH_BENCH_TINY=1)",
    )


@pytest.fixture(scope="session", autouse=True)
def _profiles_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Sizing profiles of the benchmarks never go to the user's cache (set before any module
    fixture runs a processor; subprocesses inherit it)."""
    with profiles_in(tmp_path_factory.mktemp("dynbatch-cache")):
        yield


@pytest.fixture(scope="session")
def bench_size(request: pytest.FixtureRequest) -> BenchSize:
    return TINY if request.config.getoption("--bench-size") == "tiny" else FULL


@pytest.fixture
def measure(benchmark: Any, bench_size: BenchSize) -> Callable[..., Any]:
    """``measure(fn, *args)``: benchmarks ``fn`` and returns its last result.

    Full mode lets pytest-benchmark calibrate rounds; tiny mode runs a fixed few.
    """

    def run(fn: Callable[..., Any], *args: Any) -> Any:
        if bench_size is TINY:
            return benchmark.pedantic(fn, args=args, rounds=_TINY_ROUNDS, iterations=1)
        return benchmark(fn, *args)

    return run


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Runs the benchmark with ``torch.set_num_threads(request.param)`` (indirect param)."""
    import torch

    count: int = request.param
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
