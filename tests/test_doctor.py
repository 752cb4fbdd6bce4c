"""python -m dynbatch doctor: the report, the self-tests, and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dynbatch as ds
from dynbatch import doctor


def test_doctor_reports_the_build_and_passes_its_self_tests() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"dynbatch {ds.__version__}" in out
    assert "CUDA compiled in: " in out and "GPU usable: " in out and "torch " in out
    assert "host memory: " in out and "NVML: " in out
    assert out.count("PASS") == len(doctor.self_tests())
    assert "all self-tests passed" in out


def test_a_failing_self_test_is_named_and_fails_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> str:
        raise RuntimeError("the core is on fire")

    monkeypatch.setattr(
        doctor,
        "self_tests",
        lambda: [("works", lambda: ""), ("says why", lambda: "3 of 5 lost"), ("crashes", broken)],
    )
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "PASS  works" in out
    assert "FAIL  says why: 3 of 5 lost" in out
    assert "FAIL  crashes: raised:" in out and "the core is on fire" in out
    assert "2 self-test(s) failed" in out


def test_unknown_command_prints_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "demo|doctor" in result.stderr


@pytest.mark.skipif(ds.build_info()["gpu_usable"], reason="this machine has a usable GPU")
def test_doctor_gpu_without_a_gpu_says_so_and_fails_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "doctor", "--gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "GPU checks: no usable GPU here" in result.stdout
    assert "nothing was run" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.test_transfer" name="test_gpu_a" time="0.1"/>
<testcase classname="tests.test_transfer" name="test_gpu_b" time="0.1">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_telemetry" name="test_gpu_c" time="0.0">
  <skipped message="pynvml missing"/></testcase>
</testsuite></testsuites>
"""


def _bench(group: str, impl: str, median: float, **extra: float) -> dict[str, object]:
    return {
        "group": group,
        "params": {"impl": impl},
        "stats": {"median": median},
        "extra_info": extra,
    }


def test_doctor_gpu_table_names_the_card_each_test_and_each_figure_against_its_target(
    tmp_path: Path,
) -> None:
    junit = tmp_path / "tests.xml"
    junit.write_text(_JUNIT)
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "benchmarks": [
                    _bench("gpu-h2d-64MiB", "pinned-to", 0.010),
                    _bench("gpu-h2d-64MiB", "dynbatch-staging", 0.0105),
                    _bench("gpu-gather-64", "torch.stack", 0.001),
                    _bench("gpu-gather-64", "dynbatch-gather", 0.002),
                    _bench("gpu-overlap", "serial", 0.2, efficiency=1.9),
                    _bench("gpu-overlap", "dynbatch-prefetch", 0.1, efficiency=1.04),
                ]
            }
        )
    )
    ok, lines = doctor.summarize_gpu_run("NVIDIA Test Card (cuda:0)", junit, bench, [])
    text = "\n".join(lines)
    assert lines[0].startswith("GPU checks on NVIDIA Test Card (cuda:0), ")
    assert not ok  # a GPU test failed

    def row(name: str) -> list[str]:
        line = next(line for line in lines if name in line)
        return [cell.strip() for cell in line.split("  ") if cell.strip()]

    assert row("test_gpu_a") == ["test", "test_transfer::test_gpu_a", "passed"]
    assert row("test_gpu_b")[2] == "FAILED"
    assert row("test_gpu_c")[2] == "skipped: pynvml missing"
    h2d = row("gpu-h2d-64MiB")
    assert h2d[1:] == [
        "gpu-h2d-64MiB dynbatch-staging",
        "time / peer 1.05",
        "<= 1.11 (>= 90% of the bandwidth)",
        "met",
    ]
    assert row("gpu-gather-64")[2] == "time / peer 2.00"
    assert row("gpu-gather-64")[-1] == "MISSED"
    assert row("gpu-overlap")[2] == "efficiency 1.04"
    assert not any("serial" in line or "torch.stack" in line for line in lines)  # peers
    assert "1 of 3 GPU tests passed; 3 benchmark figures -- the GPU checks FAILED" in text


def test_doctor_gpu_without_results_fails(tmp_path: Path) -> None:
    ok, lines = doctor.summarize_gpu_run("card", None, None, ["timed out after 150 s: tests"])
    assert not ok
    text = "\n".join(lines)
    assert "problem: timed out after 150 s" in text
    assert "problem: no GPU test result was recorded" in text
    assert "problem: no GPU benchmark result was recorded" in text
