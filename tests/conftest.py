from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

import dynbatch as ds


def _gpu_usable() -> bool:
    return bool(ds.build_info()["gpu_usable"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_usable():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder may be "gpu"
            item.add_marker(skip)


def os_thread_count() -> int:
    """Threads of this process as the kernel sees them (core threads included)."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """Fails the test if it leaves an OS thread running after its processors are dropped."""
    gc.collect()
    before = os_thread_count()
    yield
    gc.collect()
    assert os_thread_count() == before


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """torch on one thread for the test: on a loaded 2-core machine two OpenMP threads spin
    against each other (a digits MLP step takes 40x longer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
