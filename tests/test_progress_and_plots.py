"""progress=True (tqdm), Stats.plot() and demo --plot (matplotlib), and their missing-extra
errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import dynbatch as ds
from dynbatch import demo

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeOOM(RuntimeError):
    pass


def oom_above(limit: int):  # type: ignore[no-untyped-def]
    def model(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > limit:
            raise FakeOOM(f"batch of {len(batch)}")
        return batch.sum(1)

    return model


def final_bar(captured: str) -> str:
    """The last state tqdm drew (it redraws in place with carriage returns)."""
    return re.split(r"[\r\n]+", captured.strip())[-1]


def test_progress_counts_samples_to_the_total_of_a_sized_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = [torch.randn(8) for _ in range(300)]
    bp = ds.DynamicBatchProcessor(max_batch_size=32)
    seen = sum(len(batch) for batch in bp(data, progress=True))
    assert seen == 300
    bar = final_bar(capsys.readouterr().err)
    assert "300/300" in bar
    assert "samples/s" in bar
    assert re.search(r"batch=\d+", bar)
    assert re.search(r"host mem=\d+\.\d/\d+\.\d GiB", bar)


def test_progress_without_a_length_counts_without_a_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bp = ds.DynamicBatchProcessor(max_batch_size=16)
    for _ in bp((torch.randn(4) for _ in range(100)), progress=True):
        pass
    bar = final_bar(capsys.readouterr().err)
    assert "100samples" in bar.replace(" ", "")
    assert "/100" not in bar


def test_map_progress_counts_each_sample_once_through_out_of_memory_splits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bp = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=64, oom_errors=(FakeOOM,))
    results = bp.map(oom_above(20), [torch.randn(4) for _ in range(256)], progress=True)
    assert len(results) == 256
    assert bp.stats().ooms >= 1
    assert "256/256" in final_bar(capsys.readouterr().err)


def test_progress_without_tqdm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bp = ds.DynamicBatchProcessor()
    with pytest.raises(ImportError, match=r'pip install "dynbatch\[progress\]"'):
        bp([torch.zeros(1)], progress=True)
    with pytest.raises(ImportError, match="tqdm"):
        bp.map(lambda b: b, [torch.zeros(1)], progress=True)
    assert bp.map(lambda b: b, [torch.zeros(1)]) == [torch.zeros(1)]  # no bar: no tqdm needed


def test_plot_draws_size_throughput_memory_with_oom_and_slo_marks(tmp_path: Path) -> None:
    # Every batch takes longer than 1 us (all are SLO misses); min 32 forces OOMs above 24.
    bp = ds.DynamicBatchProcessor(
        max_batch_size=64, min_batch_size=32, oom_errors=(FakeOOM,), latency_slo_ms=0.001
    )
    bp.map(oom_above(24), [torch.randn(16) for _ in range(2000)])
    stats = bp.stats()
    assert stats.ooms >= 1 and len(stats.oom_seconds) == stats.ooms
    assert len(stats.timeline) == stats.batches
    assert all(0 <= moment <= stats.timeline[-1].seconds for moment in stats.oom_seconds)

    path = tmp_path / "run.png"
    figure = stats.plot(str(path), title="fake OOM at 25")
    assert path.read_bytes()[:8] == PNG_MAGIC
    size_axes, rate_axes, memory_axes = figure.axes
    assert "batch size" in size_axes.get_ylabel()
    assert rate_axes.get_ylabel() == "samples / s"
    assert "memory" in memory_axes.get_ylabel()
    # One dashed red line per out-of-memory error on each panel.
    for axes in figure.axes:
        oom_lines = [line for line in axes.lines if line.get_linestyle() == "--"]
        assert len(oom_lines) == stats.ooms
    misses = [c for c in size_axes.collections if c.get_label().endswith("ms)")]
    assert len(misses) == 1
    timed = [p for p in stats.timeline if p.compute_ms > 0.001]
    assert len(misses[0].get_offsets()) == len(timed) > 0


def test_plot_without_matplotlib_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bp = ds.DynamicBatchProcessor()
    list(bp([torch.zeros(2)] * 4))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "dynbatch\[plot\]"'):
        bp.stats().plot()


def test_demo_saves_the_fixed_vs_dynamic_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "demo.png"
    demo.main(["--quick", "--plot", str(path)])
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert f"figure: {path}" in capsys.readouterr().out


def test_fit_progress_counts_each_sample_once_per_epoch_through_ooms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bar counts a step once it is done: a step redone after running out of memory is
    not counted twice."""
    model = torch.nn.Linear(4, 1)
    calls = []

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        if len(calls) in (3, 7):  # the second micro-batch of a step, and another
            raise FakeOOM("simulated")
        return model(batch).pow(2).mean()

    bp = ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16, oom_errors=(FakeOOM,))
    result = bp.fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        loss_fn,
        [torch.randn(4) for _ in range(100)],
        samples_per_step=50,
        epochs=2,
        progress=True,
    )
    assert result.oom_retries == 2 and result.samples == 200
    bar = final_bar(capsys.readouterr().err)
    assert "200/200" in bar
