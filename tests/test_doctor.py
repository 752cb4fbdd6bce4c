"""python -m dynbatch doctor: the report, the self-tests, and its exit code."""

from __future__ import annotations

import subprocess
import sys

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
