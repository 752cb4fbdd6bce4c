"""Telemetry: NVML when libnvidia-ml loads, host readings otherwise.

Most tests run anywhere: they are keyed on whether this machine's libnvidia-ml can be loaded.
The fake libnvidia-ml of the C++ tests (tests/cpp/fake_nvml.cpp) is compiled here with the
system C++ compiler (or taken from a Release C++ build), so the NVML path is exercised without
a GPU; the last test compares with NVIDIA's own bindings on a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import dynbatch as ds
from dynbatch import _core

GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
FAKE_SOURCE = ROOT / "tests" / "cpp" / "fake_nvml.cpp"
# Variants of the fake: file stem -> compile definition (see fake_nvml.cpp).
FAKE_VARIANTS = {
    "fake_nvml": None,
    "fake_nvml_no_utilization": "FAKE_NVML_WITHOUT_UTILIZATION",
    "fake_nvml_init_fails": "FAKE_NVML_INIT_FAILS",
}

FakeLibrary = Callable[[str], Path]


def default_library() -> str:
    return os.environ.get("DYNBATCH_NVML_LIBRARY") or "libnvidia-ml.so.1"


def library_loads(path: str) -> bool:
    """Whether the dynamic loader can open `path`: the independent answer to compare with."""
    try:
        ctypes.CDLL(path)
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> FakeLibrary:
    """Returns the path of a fake libnvidia-ml variant, compiling it on first use."""
    compiler = os.environ.get("CXX") or next(
        (found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None
    )
    out_dir = tmp_path_factory.mktemp("fake_nvml")
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant in built:
            return built[variant]
        define = FAKE_VARIANTS[variant]
        path = out_dir / f"lib{variant}.so"
        if compiler is not None:
            command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(path)]
            command += [f"-D{define}"] if define else []
            subprocess.run([*command, str(FAKE_SOURCE)], check=True, timeout=120)
        else:
            # Release C++ builds only: a sanitizer build of the fake cannot load into Python.
            candidates = [
                ROOT / d / "tests" / "cpp" / path.name for d in ("build-cpp", "build-ci/release")
            ]
            path = next((c for c in candidates if c.is_file()), path)
            if not path.is_file():
                pytest.skip(
                    "no C++ compiler to build the fake libnvidia-ml, and no C++ build of it"
                )
        built[variant] = path
        return path

    return get


def test_nvml_status_matches_whether_libnvidia_ml_loads() -> None:
    status = _core.nvml_status()
    assert set(status) == {"available", "reason", "device_count", "library"}
    assert status["library"] == default_library()
    if not library_loads(default_library()):
        assert status["available"] is False
        assert status["reason"].startswith(f"cannot load NVML library '{default_library()}'")
        assert status["device_count"] == 0
    elif status["available"]:
        assert status["reason"] == ""
        assert status["device_count"] >= 0
    else:  # loads, but NVML does not start (e.g. no GPU): it must say why
        assert status["reason"]
        assert status["device_count"] == 0


def test_auto_is_nvml_only_where_nvml_sees_the_device(no_thread_left: None) -> None:
    status = _core.nvml_status()
    host = _core.Telemetry.auto()
    assert host.source == "host"  # device_index < 0
    host.close()

    first = _core.Telemetry.auto(0)
    if status["available"] and status["device_count"] > 0:
        assert first.source.startswith("nvml:0 ")
        assert first.latest()["memory_total_bytes"] > 0
    else:
        assert first.source == "host"
        assert first.latest()["memory_available_bytes"] > 0
    first.close()


def test_nvml_raises_with_the_reason() -> None:
    status = _core.nvml_status()
    # One past the last device: unusable with or without a GPU.
    index = status["device_count"]
    with pytest.raises(RuntimeError, match=f"NVML telemetry for device {index} is unavailable"):
        _core.Telemetry.nvml(index)
    if not status["available"]:
        with pytest.raises(RuntimeError, match=re.escape(status["reason"])):
            _core.Telemetry.nvml(0)
    with pytest.raises(ValueError, match="device_index"):
        _core.Telemetry.nvml(-1)
    with pytest.raises(TypeError):
        _core.Telemetry.nvml(0, library=3)  # type: ignore[arg-type]


def test_snapshot_has_host_readings_and_the_gpus_nvml_sees() -> None:
    snapshot = ds.telemetry()
    assert set(snapshot) == {"host", "gpus", "nvml"}
    host = snapshot["host"]
    assert host["source"] == "host"
    assert 0 < host["memory_available_bytes"] <= host["memory_total_bytes"]
    assert host["process_rss_bytes"] > 0
    assert snapshot["nvml"] == _core.nvml_status()
    if snapshot["nvml"]["available"]:
        assert [gpu["index"] for gpu in snapshot["gpus"]] == list(
            range(snapshot["nvml"]["device_count"])
        )
    else:
        assert snapshot["gpus"] == []


def test_fake_library_values_reach_python(fake_nvml: FakeLibrary, no_thread_left: None) -> None:
    fake = fake_nvml("fake_nvml")
    assert _core.nvml_status(str(fake)) == {
        "available": True,
        "reason": "",
        "device_count": 2,
        "library": str(fake),
    }
    first, second = _core.nvml_devices(fake)
    assert first == {
        "index": 0,
        "name": "Fake GPU 0",
        "memory_total_bytes": 16 * GIB,
        "memory_free_bytes": 12 * GIB,
        "memory_used_bytes": 4 * GIB - 300 * MIB,
        "memory_reserved_bytes": 300 * MIB,
        "utilization": 0.37,
        "memory_utilization": 0.12,
        "error": "",
    }
    assert (second["name"], second["memory_free_bytes"], second["utilization"]) == (
        "Fake GPU 1",
        20 * GIB,
        0.91,
    )

    telemetry = _core.Telemetry.nvml(1, period_s=0.01, library=fake)
    assert telemetry.source == "nvml:1 Fake GPU 1"
    latest = telemetry.latest()
    assert latest["source"] == "nvml:1 Fake GPU 1"
    assert latest["memory_total_bytes"] == 80 * GIB
    assert latest["memory_available_bytes"] == 20 * GIB
    assert latest["utilization"] == 0.91
    assert latest["process_rss_bytes"] > 0
    assert telemetry.min_available_bytes == 20 * GIB
    telemetry.close()

    with pytest.raises(RuntimeError, match="out of range: NVML sees 2 device"):
        _core.Telemetry.nvml(2, library=fake)


def test_broken_fake_libraries_say_why(fake_nvml: FakeLibrary) -> None:
    missing = fake_nvml("fake_nvml_no_utilization")
    with pytest.raises(
        RuntimeError, match="lacks the required symbol nvmlDeviceGetUtilizationRates"
    ):
        _core.Telemetry.nvml(0, library=missing)
    status = _core.nvml_status(missing)
    assert not status["available"]
    assert "nvmlDeviceGetUtilizationRates" in status["reason"]
    assert _core.nvml_devices(missing) == []

    failing = fake_nvml("fake_nvml_init_fails")
    with pytest.raises(RuntimeError, match=re.escape("nvmlInit_v2 failed: Driver Not Loaded")):
        _core.Telemetry.nvml(0, library=failing)


def test_environment_variable_points_the_default_at_the_fake(fake_nvml: FakeLibrary) -> None:
    fake = fake_nvml("fake_nvml")
    # The variable is read once per process, so a fresh interpreter reads it.
    script = """
import json
import dynbatch as ds
from dynbatch import _core
auto = _core.Telemetry.auto(0)
out = {
    "auto": auto.source,
    "latest": auto.latest(),
    "out_of_range": _core.Telemetry.auto(5).source,
    "host": _core.Telemetry.auto().source,
    "snapshot": ds.telemetry(),
}
print(json.dumps(out))
"""
    env = {**os.environ, "DYNBATCH_NVML_LIBRARY": str(fake)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["auto"] == "nvml:0 Fake GPU 0"
    assert out["latest"]["memory_total_bytes"] == 16 * GIB
    assert out["latest"]["memory_available_bytes"] == 12 * GIB
    assert out["latest"]["utilization"] == 0.37
    assert out["out_of_range"] == "host"
    assert out["host"] == "host"
    snapshot = out["snapshot"]
    assert snapshot["nvml"] == {
        "available": True,
        "reason": "",
        "device_count": 2,
        "library": str(fake),
    }
    assert [gpu["name"] for gpu in snapshot["gpus"]] == ["Fake GPU 0", "Fake GPU 1"]
    assert snapshot["gpus"][1]["memory_total_bytes"] == 80 * GIB
    assert snapshot["gpus"][1]["memory_used_bytes"] == 60 * GIB - 512 * MIB
    assert snapshot["host"]["source"] == "host"


@pytest.mark.gpu
def test_nvml_readings_match_pynvml(no_thread_left: None) -> None:
    pynvml = pytest.importorskip("pynvml")
    status = _core.nvml_status()
    assert status["available"], status["reason"]
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        expected = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    name = name.decode() if isinstance(name, bytes) else name
    tolerance = 0.05 * expected.total + 64 * MIB  # other processes allocate meanwhile

    snapshot = ds.telemetry()
    assert snapshot["nvml"]["device_count"] == count
    gpu = snapshot["gpus"][0]
    assert gpu["name"] == name
    assert gpu["memory_total_bytes"] == expected.total
    assert gpu["memory_free_bytes"] is not None
    assert abs(gpu["memory_free_bytes"] - expected.free) <= tolerance
    assert gpu["utilization"] is not None
    assert 0.0 <= gpu["utilization"] <= 1.0

    telemetry = _core.Telemetry.nvml(0)
    assert telemetry.source == f"nvml:0 {name}"
    latest = telemetry.latest()
    assert latest["memory_total_bytes"] == expected.total
    assert abs(latest["memory_available_bytes"] - expected.free) <= tolerance
    assert 0.0 <= latest["utilization"] <= 1.0
    telemetry.close()


def test_pci_bus_id_maps_to_nvml_numbering(fake_nvml: FakeLibrary) -> None:
    library = str(fake_nvml("fake_nvml"))
    assert _core.nvml_index_of_pci_bus_id("00000000:5E:00.0", library=library) == 1
    assert _core.nvml_index_of_pci_bus_id("00000000:99:00.0", library=library) == -1
    assert _core.nvml_index_of_pci_bus_id("00000000:3B:00.0", library="/nonexistent.so") == -1


def test_doctor_shows_each_gpu_nvml_reports(fake_nvml: FakeLibrary) -> None:
    library = fake_nvml("fake_nvml")
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DYNBATCH_NVML_LIBRARY": str(library)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"NVML: 2 device(s) via {library}" in result.stdout
    assert "  NVML 0 Fake GPU 0: " in result.stdout and "of 16,384 MiB" in result.stdout
    assert "  NVML 1 Fake GPU 1: " in result.stdout and "of 81,920 MiB" in result.stdout
