"""The adaptive step size: the noise scale estimate, the learning-rate rules, the goodput
decision, and fit(samples_per_step="auto") following a scripted noise scale. Whether it
trains faster is a benchmark question (bench/test_bench_training.py), not a test."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import dynbatch as ds
from dynbatch.adaptive import AdaptiveSteps, NoiseScale, lr_factor

from .training_models import cross_entropy, digits, mlp

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _observe_exact(noise: NoiseScale, sqr: float, trace: float, small: int, big: int) -> None:
    """The expected squared norms of mean gradients over ``small`` and ``big`` samples."""
    noise.observe(small, sqr + trace / small, big, sqr + trace / big)


def test_the_noise_scale_from_two_batch_sizes() -> None:
    noise = NoiseScale()
    assert noise.value is None
    for _ in range(3):
        _observe_exact(noise, sqr=2.0, trace=300.0, small=16, big=64)
    assert noise.value == pytest.approx(150.0)
    _observe_exact(noise, sqr=2.0, trace=300.0, small=8, big=256)  # any pair of sizes
    assert noise.value == pytest.approx(150.0)
    noise.observe(64, 1.0, 64, 1.0)  # one size tells nothing: ignored
    noise.observe(8, math.nan, 64, 1.0)
    assert noise.count == 4
    copy = NoiseScale()
    copy.load_state_dict(noise.state_dict())
    assert copy.value == noise.value


def test_the_noise_scale_follows_a_change_smoothly() -> None:
    noise = NoiseScale(smoothing=0.9)
    for _ in range(50):
        _observe_exact(noise, sqr=1.0, trace=10.0, small=16, big=64)
    assert noise.value == pytest.approx(10.0)
    values = []
    for _ in range(60):
        _observe_exact(noise, sqr=1.0, trace=1000.0, small=16, big=64)
        values.append(noise.value)
    assert values == sorted(values)  # rises monotonically toward the new scale
    assert 10 < values[0] < 200 and values[-1] == pytest.approx(1000.0, rel=0.01)


def test_learning_rate_rules() -> None:
    assert lr_factor(None, 128, 32, 50.0) == 1.0
    assert lr_factor("linear", 128, 32, None) == 4.0
    assert lr_factor("sqrt", 128, 32, None) == 2.0
    assert lr_factor("adascale", 128, 32, None) == 1.0  # no estimate yet: as tuned
    assert lr_factor("adascale", 32, 32, 500.0) == pytest.approx(1.0)
    # gain = (B/N0 + 1) / (B/N + 1): near linear for a noisy gradient, near 1 for a clean one
    assert lr_factor("adascale", 128, 32, 1e9) == pytest.approx(4.0, rel=1e-6)
    assert lr_factor("adascale", 128, 32, 1e-9) == pytest.approx(1.0, rel=1e-6)
    assert lr_factor("adascale", 128, 32, 96.0) == pytest.approx((3 + 1) / (0.75 + 1))
    assert lr_factor("adascale", 128, 32, math.inf) == 4.0


def _scripted(noise_trace: float) -> AdaptiveSteps:
    # micro-batches cost 0.2 ms + 10 us per sample in the model, up to 64 at a time, and 50 us
    # of the loop's own; the optimizer 2 ms a step; reading a sample 5 us
    steps = AdaptiveSteps(32, 32, 1024, lambda: (2e5, 1e4, 64))
    compute = 2e5 + 32 * 1e4
    wall = compute + 5e4 + 2e6 + 32 * 5e3
    steps.observe_step(32, 1, wall_ns=wall, compute_ns=compute, optimizer_ns=2e6, read_ns=32 * 5e3)
    assert steps.step_seconds(32) == pytest.approx(wall * 1e-9)
    # 128 samples: two micro-batches of 64
    assert steps.step_seconds(128) == pytest.approx(
        (2e6 + 2 * (2e5 + 5e4) + 128 * (5e3 + 1e4)) * 1e-9
    )
    for _ in range(10):
        _observe_exact(steps.noise, sqr=1.0, trace=noise_trace, small=16, big=32)
    return steps


def test_the_step_size_follows_the_noise_scale() -> None:
    quiet, noisy = _scripted(1.0), _scripted(1e5)
    assert quiet.decide() == 32  # a clean gradient: bigger steps waste samples
    assert noisy.decide() == 1024  # pure noise: as big as allowed (throughput wins)
    middle = _scripted(300.0)
    chosen = middle.decide()
    assert 32 < chosen < 1024
    assert (
        middle.goodput(chosen)
        >= max(middle.goodput(n) or 0.0 for n in (32, 64, 128, 256, 512, 1024)) / 1.03
    )
    # and it moves online as the scale changes
    for _ in range(80):
        _observe_exact(middle.noise, sqr=1.0, trace=1e5, small=16, big=chosen)
    assert middle.decide() > chosen


def test_no_decision_before_the_estimates_are_in() -> None:
    steps = AdaptiveSteps(32, 32, 1024, lambda: None)
    for _ in range(10):
        _observe_exact(steps.noise, sqr=1.0, trace=1e5, small=16, big=32)
    assert steps.decide() == 32  # no cost model: stays at the base
    restored = AdaptiveSteps(32, 32, 1024, lambda: (2e5, 1e4, 64))
    noisy = _scripted(1e5)
    noisy.decide()
    restored.load_state_dict(noisy.state_dict())
    assert restored.current == 1024 and restored.noise.value == noisy.noise.value


_DIM = 256


class _Mean(torch.nn.Module):
    """A parameter vector w; a sample x's loss |w - x|^2 / 2 has the gradient w - x. With the
    learning rate at 0, w stays put (all ones) and, for x ~ N(0, spread^2) in every
    dimension, the noise scale tr(Sigma) / |G|^2 is spread^2: scripted by the data."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(_DIM, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w - x


def _half_square(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return (model(batch) ** 2).sum(1).mean() / 2


@pytest.mark.parametrize(("spread", "grows"), [(0.01, False), (40.0, True)])
def test_fit_auto_follows_a_scripted_noise_scale(spread: float, grows: bool) -> None:
    torch.manual_seed(0)
    data = list(torch.randn(12000, _DIM, dtype=torch.float64) * spread)
    model = _Mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with ds.DynamicBatchProcessor(max_batch_size=64) as processor:
        result = processor.fit(
            model,
            optimizer,
            _half_square,
            data,
            samples_per_step="auto",
            max_samples_per_step=2048,
        )
    sizes = [step.samples for step in result]
    assert all(32 <= n <= 2048 for n in sizes[:-1])
    assert result.samples == len(data)
    noise = result.steps[-1].noise_scale
    assert noise is not None
    if grows:  # the efficiency of bigger steps stays near 1: throughput decides
        assert spread**2 / 4 < noise < spread**2 * 4  # a large scale is estimated loosely
        assert sizes[0] == 32 and max(sizes) >= 128
    else:  # bigger steps would waste samples
        assert noise < 0.01
        assert max(sizes) == 32


def test_fit_auto_scales_the_learning_rate_by_the_rule() -> None:
    inputs, targets = digits()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with ds.DynamicBatchProcessor(max_batch_size=64) as processor:
        result = processor.fit(
            model,
            optimizer,
            cross_entropy,
            ds.paired(inputs, targets),
            samples_per_step="auto",
            lr_scaling="linear",
            epochs=3,
        )
        state = processor.state_dict()["training"]["adaptive"]
    for step in result.steps:
        assert step.lr == pytest.approx(0.05 * step.samples / 32)
    assert optimizer.param_groups[0]["lr"] == 0.05  # the tuned value is left as it was
    assert state["noise"]["count"] > 0 and state["current"] >= 32
    assert result.samples == 3 * len(inputs)
