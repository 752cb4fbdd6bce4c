"""Training: constant-step micro-batches (steps), the fit loop, and their equality with a plain
fixed-batch loop (digits MLP in float64)."""

from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dynbatch as ds

from .training_models import (
    assert_same_parameters,
    cross_entropy,
    digits,
    fixed_batch_loop,
    mlp,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _sgd(model: torch.nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def test_steps_add_up_to_a_fixed_batch_of_64() -> None:
    """The gate of item 1: micro-batches of 16 accumulated to steps of 64 give the parameters of
    a plain batch-64 loop over the same order."""
    inputs, targets = digits()
    reference = mlp()
    fixed_batch_loop(reference, _sgd(reference), inputs, targets, 64)

    model = mlp()
    optimizer = _sgd(model)
    sizes: list[int] = []
    seen: list[int] = []
    with ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16) as processor:
        for micro in processor.steps(ds.paired(inputs, targets), samples_per_step=64):
            step_range = range(64 * micro.step, 64 * micro.step + micro.step_samples)
            assert all(i in step_range for i in micro.indices)  # never straddles two steps
            assert micro.weight == micro.size / micro.step_samples
            (cross_entropy(model, micro.data) * micro.weight).backward()
            sizes.append(micro.size)
            seen.extend(micro.indices)
            if micro.last:
                optimizer.step()
                optimizer.zero_grad()
    assert seen == list(range(len(inputs)))
    assert sizes == [16] * (4 * (len(inputs) // 64)) + [len(inputs) % 64]
    assert_same_parameters(model, reference)


def test_fit_equals_a_fixed_batch_loop() -> None:
    """The gate through fit (item 2), with the engine choosing nothing above 16."""
    inputs, targets = digits()
    reference = mlp()
    fixed_batch_loop(reference, _sgd(reference), inputs, targets, 64)

    model = mlp()
    with ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16) as processor:
        result = processor.fit(
            model, _sgd(model), cross_entropy, ds.paired(inputs, targets), samples_per_step=64
        )
    assert_same_parameters(model, reference)
    assert len(result) == math.ceil(len(inputs) / 64)
    assert [step.samples for step in result] == [64] * 28 + [5]
    assert [step.micro_batches for step in result] == [4] * 28 + [1]
    assert result.samples == len(inputs)
    assert all(step.lr == 0.1 and math.isfinite(step.loss) for step in result)
    assert all(step.samples_per_second > 0 for step in result)
    assert result.steps[-1].loss < result.steps[0].loss


def test_fit_with_engine_sized_micro_batches_matches_too() -> None:
    """With the engine free to choose (1..1024), the step still adds up to 64 exactly."""
    inputs, targets = digits()
    reference = mlp()
    fixed_batch_loop(reference, _sgd(reference), inputs, targets, 64)
    model = mlp()
    with ds.DynamicBatchProcessor() as processor:
        result = processor.fit(
            model, _sgd(model), cross_entropy, ds.paired(inputs, targets), samples_per_step=64
        )
    assert_same_parameters(model, reference)
    assert result.samples == len(inputs)


def test_drop_last_drops_the_short_step() -> None:
    inputs, targets = digits()
    reference = mlp()
    cut = 64 * (len(inputs) // 64)
    fixed_batch_loop(reference, _sgd(reference), inputs[:cut], targets[:cut], 64)
    model = mlp()
    with ds.DynamicBatchProcessor(max_batch_size=32) as processor:
        result = processor.fit(
            model,
            _sgd(model),
            cross_entropy,
            ds.paired(inputs, targets),
            samples_per_step=64,
            drop_last=True,
        )
    assert [step.samples for step in result] == [64] * (len(inputs) // 64)
    assert_same_parameters(model, reference)


def test_fit_continues_where_the_last_call_stopped() -> None:
    """Two calls (a mid-epoch stop with max_steps, then the rest) equal one."""
    inputs, targets = digits()
    reference = mlp()
    optimizer = _sgd(reference)
    for _ in range(2):
        fixed_batch_loop(reference, optimizer, inputs, targets, 64)
    model = mlp()
    optimizer = _sgd(model)
    data = ds.paired(inputs, targets)
    with ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16) as processor:
        first = processor.fit(
            model, optimizer, cross_entropy, data, samples_per_step=64, epochs=2, max_steps=10
        )
        assert len(first) == 10
        assert processor.state_dict()["training"]["position"] == 640
        second = processor.fit(model, optimizer, cross_entropy, data, samples_per_step=64)
        assert [step.step for step in second][:1] == [10]
        assert second.steps[-1].epoch == 0
        third = processor.fit(model, optimizer, cross_entropy, data, samples_per_step=64)
        assert third.steps[0].epoch == 1 and third.steps[-1].epoch == 1
    assert_same_parameters(model, reference)


def test_lr_scheduler_and_gradient_clipping() -> None:
    inputs, targets = digits()
    reference = mlp()
    optimizer = _sgd(reference, lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)

    def clip_then_step() -> None:
        scheduler.step()

    # the reference clips between backward and step: a loop of its own
    positions = torch.arange(len(inputs))
    lrs = []
    for start in range(0, len(inputs), 64):
        chosen = positions[start : start + 64]
        optimizer.zero_grad()
        cross_entropy(reference, (inputs[chosen], targets[chosen])).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.25)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        clip_then_step()

    model = mlp()
    optimizer = _sgd(model, lr=0.5)
    scheduler_ = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    with ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=8) as processor:
        result = processor.fit(
            model,
            optimizer,
            cross_entropy,
            ds.paired(inputs, targets),
            samples_per_step=64,
            max_grad_norm=0.25,
            lr_scheduler=scheduler_,
        )
    assert [step.lr for step in result] == lrs
    assert_same_parameters(model, reference)


def test_autocast_with_a_grad_scaler() -> None:
    """fit runs under torch.autocast with a GradScaler (CPU bfloat16 here; the same code
    scales float16 losses on a GPU) and equals the same loop written by hand."""
    inputs, targets = digits(torch.float32)

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cross_entropy(model, batch).float()

    reference = mlp(dtype=torch.float32)
    optimizer = _sgd(reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for start in range(0, len(inputs), 64):
        optimizer.zero_grad()
        for micro in range(start, min(start + 64, len(inputs)), 16):
            end = min(micro + 16, start + 64, len(inputs))
            weight = (end - micro) / (min(start + 64, len(inputs)) - start)
            loss = loss_fn(reference, (inputs[micro:end], targets[micro:end])) * weight
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model = mlp(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with ds.DynamicBatchProcessor(max_batch_size=16, min_batch_size=16) as processor:
        processor.fit(
            model,
            _sgd(model),
            loss_fn,
            ds.paired(inputs, targets),
            samples_per_step=64,
            grad_scaler=scaler,
        )
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert scaler.get_scale() == 1024.0 * 2**0  # no inf seen, fewer than 2000 steps


def test_steps_accept_a_plain_iterable_and_a_dataset() -> None:
    inputs, targets = digits()
    samples = [(inputs[i], targets[i]) for i in range(100)]
    with ds.DynamicBatchProcessor(max_batch_size=8) as processor:
        generated = list(processor.steps(iter(samples), samples_per_step=30))
        dataset = torch.utils.data.TensorDataset(inputs[:100], targets[:100])
        indexed = list(processor.steps(dataset, samples_per_step=30))
    for epoch, micro_batches in enumerate((generated, indexed)):  # the second pass goes on
        assert sum(m.size for m in micro_batches) == 100
        by_step: dict[int, int] = {}
        for micro in micro_batches:
            by_step[micro.step] = by_step.get(micro.step, 0) + micro.size
        assert sorted(by_step.values()) == [10, 30, 30, 30]
        assert [m.epoch for m in micro_batches] == [epoch] * len(micro_batches)
        assert sum(m.weight for m in micro_batches) == pytest.approx(4.0)


def test_the_own_loop_example_runs_and_matches_a_plain_loop() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "train_own_loop.py"
    result = subprocess.run(
        [sys.executable, str(example)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"1797 samples in 29 steps of 64; [1-9]\d* step\(s\) run again after running out of "
        r"memory; .* parameters equal a plain batch-64 loop",
        result.stdout,
    )


def test_close_stops_an_abandoned_training_pass() -> None:
    inputs, targets = torch.randn(200, 8), torch.randint(0, 10, (200,))
    with ds.DynamicBatchProcessor() as warm:  # process-wide helpers start once, and stay
        list(warm(ds.paired(inputs, targets)))
    gc.collect()
    threads = len(os.listdir("/proc/self/task"))
    processor = ds.DynamicBatchProcessor(max_batch_size=16)
    steps = processor.steps(ds.paired(inputs, targets), samples_per_step=64)
    next(steps)
    assert processor.stats().batches >= 1
    assert len(os.listdir("/proc/self/task")) > threads  # the pass's core thread
    processor.close()
    gc.collect()
    assert len(os.listdir("/proc/self/task")) == threads
    with pytest.raises(StopIteration):
        next(steps)
    with pytest.raises(RuntimeError, match="closed"):
        processor.steps(ds.paired(inputs, targets), samples_per_step=64)


def test_the_training_demo_prints_the_lectures_columns() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dynbatch", "demo", "--train", "--quick"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("mode"))
    for column in ("mean batch", "samples/s", "memory use", "to ", "final acc"):
        assert column in header
    for mode in ("DataLoader fixed 32", "dynbatch fixed 32", "dynbatch auto (adascale)"):
        row = next(line for line in lines if line.startswith(mode))
        assert re.search(r"\d+\.\d%\s+(-|\d+\.\d\d s)\s+\d+\.\d%$", row), row
