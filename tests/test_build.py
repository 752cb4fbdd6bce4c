"""The package imports and describes its build, with or without CUDA and a GPU."""

from __future__ import annotations

import re

import dynbatch as ds


def test_build_info_describes_the_build() -> None:
    info = ds.build_info()
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"])
    assert info["version"] == ds.__version__
    assert info["compiler"]
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["gpu_usable"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_runtime_version"] > 0
        assert "90" in info["cuda_architectures"]
    else:
        assert info["cuda_runtime_version"] == 0
        assert not info["gpu_usable"]
    if not info["gpu_usable"]:
        assert info["gpu_detail"], "a GPU that is not usable must say why"


def test_telemetry_reads_host_memory() -> None:
    reading = ds.telemetry()["host"]
    assert reading["source"] == "host"
    assert 0 < reading["memory_available_bytes"] <= reading["memory_total_bytes"]
    assert reading["process_rss_bytes"] > 0


def test_public_api_is_typed() -> None:
    import importlib.resources

    assert importlib.resources.files("dynbatch").joinpath("py.typed").is_file()
    assert importlib.resources.files("dynbatch").joinpath("_core.pyi").is_file()
