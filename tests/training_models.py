"""The digits data and small models shared by the training tests, examples and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def digits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 samples, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=dtype) / 16.0
    return inputs, torch.tensor(data.target, dtype=torch.int64)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    ).to(dtype)


def cross_entropy(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def fixed_batch_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    size: int,
    order: list[int] | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """The plain loop dynbatch must match: batches of ``size`` in ``order``."""
    positions = torch.arange(len(inputs)) if order is None else torch.tensor(order)
    for start in range(0, len(positions), size):
        chosen = positions[start : start + size]
        optimizer.zero_grad()
        cross_entropy(model, (inputs[chosen], targets[chosen])).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def assert_same_parameters(left: torch.nn.Module, right: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(left.named_parameters(), right.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (name, (a - b).abs().max())
