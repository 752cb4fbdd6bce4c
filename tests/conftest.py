from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import dynbatch as ds

from .cache_dir import profiles_in


def _gpu_usable() -> bool:
    return bool(ds.build_info()["gpu_usable"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_usable():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder may be "gpu"
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _profiles_in_a_temporary_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """Sizing profiles never go to the user's cache: one folder for the session (module
    fixtures, subprocesses)."""
    with profiles_in(tmp_path_factory.mktemp("dynbatch-cache")):
        yield


@pytest.fixture(autouse=True)
def _profiles_per_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile folder of each test's own: no test starts from the sizes another learned."""
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(tmp_path / "dynbatch-cache"))


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
