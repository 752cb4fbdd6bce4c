"""Training runs on scikit-learn's digits, measured: the demo's training table (``python -m
dynbatch demo --train``) and the time-to-accuracy benchmark share them.

A run trains one model for a budget of epochs and evaluates the test accuracy every
``EVAL_EVERY`` training samples; the time to a target accuracy counts training only (the
evaluations are excluded from every run alike). Runs: a plain loop over
``DataLoader(TensorDataset, batch_size=k, shuffle=True)`` (what a user writes), or
``processor.fit`` with a fixed or adaptive step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import _core
from .processor import DynamicBatchProcessor
from .training import paired

__all__ = [
    "EVAL_EVERY",
    "Digits",
    "RunResult",
    "cnn",
    "load_digits_split",
    "mlp",
    "run_dynbatch",
    "run_loader",
    "train_table",
]

EVAL_EVERY = 128  # training samples between two evaluations


@dataclass(frozen=True)
class Digits:
    """Train and test splits of the 1797 digits (8x8, scaled to [0, 1]); ``image`` keeps
    the 1x8x8 shape for a CNN, else 64 features."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(image: bool = False, test_fraction: float = 0.2) -> Digits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the training demo uses scikit-learn's bundled digits: pip install scikit-learn"
        ) from None
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    if image:
        inputs = inputs.reshape(-1, 1, 8, 8)
    targets = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    cut = len(inputs) - int(len(inputs) * test_fraction)
    train, test = order[:cut], order[cut:]
    return Digits(inputs[train], targets[train], inputs[test], targets[test])


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


@dataclass
class RunResult:
    """One training run: its final accuracy, what it ran, and its evaluations as (samples
    trained, training seconds, test accuracy)."""

    name: str
    final_accuracy: float
    seconds: float  # training time of the whole budget
    samples: int
    steps: int
    mean_step: float  # samples per optimizer step
    mean_micro: float  # samples per forward/backward
    memory_use: float = 0.0  # peak use as a share of what the device (or host) allows
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(training seconds, samples) at the first evaluation at or above ``target``."""
        for samples, seconds, accuracy in self.evaluations:
            if accuracy >= target:
                return seconds, samples
        return None


class _Clock:
    """Training time with the evaluations taken out."""

    def __init__(self, model: torch.nn.Module, digits: Digits) -> None:
        self.model = model
        self.digits = digits
        self.seen = 0
        self.next_eval = EVAL_EVERY
        self.elapsed = 0.0
        self.evaluations: list[tuple[int, float, float]] = []
        self.started = time.perf_counter()

    def pause(self) -> None:
        self.elapsed += time.perf_counter() - self.started

    def resume(self) -> None:
        self.started = time.perf_counter()

    def trained(self, samples: int) -> None:
        self.seen += samples
        if self.seen < self.next_eval:
            return
        self.pause()
        self.evaluations.append((self.seen, self.elapsed, evaluate(self.model, self.digits)))
        self.next_eval = (self.seen // EVAL_EVERY + 1) * EVAL_EVERY
        self.resume()


def evaluate(model: torch.nn.Module, digits: Digits) -> float:
    with torch.no_grad():
        predicted = model(digits.test_x).argmax(1)
    return float((predicted == digits.test_y).float().mean())


def run_loader(
    name: str,
    make_model: Callable[[int], torch.nn.Module],
    digits: Digits,
    *,
    batch_size: int,
    lr: float,
    seed: int,
    epochs: int,
) -> RunResult:
    """The plain loop: ``DataLoader(..., batch_size, shuffle=True)``, SGD with momentum."""
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(
        TensorDataset(digits.train_x, digits.train_y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    telemetry = _core.Telemetry.host(0.02)
    telemetry.reset_peak()
    clock = _Clock(model, digits)
    steps = 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            _loss(model, batch).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
            clock.trained(len(batch[1]))
    clock.pause()
    result = RunResult(
        name,
        evaluate(model, digits),
        clock.elapsed,
        clock.seen,
        steps,
        clock.seen / max(steps, 1),
        clock.seen / max(steps, 1),
        telemetry.peak_rss_bytes / max(int(telemetry.latest()["memory_total_bytes"]), 1),
        clock.evaluations,
    )
    telemetry.close()
    return result


def run_dynbatch(
    name: str,
    make_model: Callable[[int], torch.nn.Module],
    digits: Digits,
    *,
    samples_per_step: int | str,
    lr: float,
    seed: int,
    epochs: int,
    max_batch_size: int = 1024,
    max_samples_per_step: int | None = None,
) -> RunResult:
    """``processor.fit`` with SGD with momentum (``lr`` read as tuned for 32 under "auto")."""
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    clock = _Clock(model, digits)
    with DynamicBatchProcessor(max_batch_size=max_batch_size) as processor:
        processor.reset_stats()
        clock.resume()
        result = processor.fit(
            model,
            optimizer,
            _loss,
            paired(digits.train_x, digits.train_y),
            samples_per_step=samples_per_step,
            epochs=epochs,
            shuffle=True,
            seed=seed,
            max_samples_per_step=max_samples_per_step,
            on_step=lambda step: clock.trained(step.samples),
        )
        clock.pause()
        stats = processor.stats()
    micro = sum(step.micro_batches for step in result)
    return RunResult(
        name,
        evaluate(model, digits),
        clock.elapsed,
        clock.seen,
        len(result),
        result.mean_samples_per_step,
        clock.seen / max(micro, 1),
        stats.peak_memory_use,
        clock.evaluations,
    )


def _to_target(row: RunResult, target: float) -> str:
    reached = row.time_to(target)
    return "-" if reached is None else f"{reached[0]:.2f} s"


def train_table(rows: list[RunResult], baseline: RunResult, target: float) -> str:
    """The lecture's columns, for training runs."""
    header = (
        f"{'mode':<26} {'mean batch':>10} {'micro':>6} {'samples/s':>10} {'vs DataLoader':>13} "
        f"{'memory use':>10} {'to ' + format(target, '.1%'):>9} {'final acc':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.name:<26} {row.mean_step:>10.1f} {row.mean_micro:>6.1f} "
            f"{row.samples_per_second:>10,.0f} "
            f"{row.samples_per_second / baseline.samples_per_second:>12.2f}x "
            f"{row.memory_use:>10.1%} {_to_target(row, target):>9} {row.final_accuracy:>9.1%}"
        )
    return "\n".join(lines)


def run_train_demo(epochs: int, lr: float, echo: Callable[[str], None]) -> None:
    """Fixed batch 32 (a DataLoader loop and dynbatch) against dynamic batching, the digits
    MLP on this machine's CPU; the target is fixed 32's final accuracy, rounded down to 0.5%."""
    digits = load_digits_split()
    threads = torch.get_num_threads()
    echo(
        f"training: MLP 64-128-10 on scikit-learn's digits ({len(digits.train_y)} train, "
        f"{len(digits.test_y)} test), SGD momentum 0.9, lr {lr} (tuned for 32), {epochs} "
        f"epochs, torch on {threads} thread(s); time to target counts training only\n"
    )
    rows = [
        run_loader("DataLoader fixed 32", mlp, digits, batch_size=32, lr=lr, seed=0, epochs=epochs),
        run_dynbatch(
            "dynbatch fixed 32", mlp, digits, samples_per_step=32, lr=lr, seed=0, epochs=epochs
        ),
        run_dynbatch(
            "dynbatch auto (adascale)",
            mlp,
            digits,
            samples_per_step="auto",
            lr=lr,
            seed=0,
            epochs=epochs,
        ),
    ]
    target = math.floor(rows[0].final_accuracy * 200) / 200
    echo(train_table(rows, rows[0], target))
    echo(
        "\nmean batch: samples per optimizer step; micro: samples per forward/backward; memory "
        "use: the peak as a share of what the device allows (here the host: the process's "
        "peak RSS of the machine's memory); to target: training seconds (evaluations "
        "excluded) to fixed 32's final accuracy, rounded down to 0.5%."
    )
