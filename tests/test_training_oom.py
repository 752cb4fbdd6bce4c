"""Training through out-of-memory errors: a step that fails in forward or backward is run again
in smaller micro-batches, and nothing is lost or counted twice."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import dynbatch as ds

from .simulated_device import SimulatedOOM
from .training_models import assert_same_parameters, cross_entropy, digits, fixed_batch_loop, mlp

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class _FailInBackward(torch.autograd.Function):
    """Identity whose backward raises when asked to: the layers after it have their
    gradients accumulated already, the layers before it not."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, fail: bool) -> torch.Tensor:
        ctx.fail = fail
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.fail:
            raise SimulatedOOM("simulated out of memory in backward")
        return grad, None


class FlakyMLP(torch.nn.Module):
    """The digits MLP running out of memory on chosen calls: in forward on the ones in
    ``forward_failures``, in the middle of backward on the ones in ``backward_failures``."""

    def __init__(self, forward_failures: set[int], backward_failures: set[int]) -> None:
        super().__init__()
        self.net = mlp()
        self.forward_failures = forward_failures
        self.backward_failures = backward_failures
        self.calls = 0
        self.failed_sizes: list[int] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        call = self.calls
        self.calls += 1
        big_enough = len(inputs) > 1
        if big_enough and call in self.forward_failures:
            self.failed_sizes.append(len(inputs))
            raise SimulatedOOM("simulated out of memory in forward")
        hidden = self.net[1](self.net[0](inputs))
        fail_later = big_enough and call in self.backward_failures
        if fail_later:
            self.failed_sizes.append(len(inputs))
        hidden = _FailInBackward.apply(hidden, fail_later)
        return self.net[2](hidden)


def _failures(seed: int) -> tuple[set[int], set[int]]:
    """Two calls that fail in forward and two in backward, among the first 11. Each failure
    halves the ceiling (64 -> 4 at most), so every chosen call still fails."""
    chosen = random.Random(seed).sample(range(1, 12), 4)
    return set(chosen[:2]), set(chosen[2:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_through_random_ooms_equals_the_run_without(seed: int) -> None:
    inputs, targets = digits()
    inputs, targets = inputs[:704], targets[:704]  # 11 steps: the ceiling may fall to 1
    reference = mlp()
    fixed_batch_loop(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), inputs, targets, 64
    )

    forward_failures, backward_failures = _failures(seed)
    model = FlakyMLP(forward_failures, backward_failures)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with ds.DynamicBatchProcessor(
        max_batch_size=64, min_batch_size=16, oom_errors=(SimulatedOOM,)
    ) as processor:
        result = processor.fit(
            model, optimizer, cross_entropy, ds.paired(inputs, targets), samples_per_step=64
        )
        stats = processor.stats()
    assert result.oom_retries == len(model.failed_sizes) >= 2  # each failure: one step rerun
    assert sum(step.retries for step in result) == result.oom_retries
    assert result.samples == len(inputs)
    # the ceiling learned holds for the rest of the run (probing back up slowly)
    assert stats.oom_ceiling < max(model.failed_sizes)
    assert_same_parameters(model.net, reference)


def test_own_loop_report_oom_reyields_the_step() -> None:
    """The iterator's contract: zero the gradients, report_oom(), and the whole step comes
    again; each sample counts once per epoch among the micro-batches of completed steps."""
    inputs, targets = digits()
    reference = mlp()
    fixed_batch_loop(
        reference, torch.optim.SGD(reference.parameters(), lr=0.1), inputs, targets, 64
    )

    forward_failures, backward_failures = _failures(7)
    model = FlakyMLP(forward_failures, backward_failures)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    contributed: list[int] = []
    in_step: list[int] = []
    reported: list[int] = []  # the steps that ran out of memory, once per report
    with ds.DynamicBatchProcessor(
        max_batch_size=64, min_batch_size=16, oom_errors=(SimulatedOOM,)
    ) as processor:
        steps = processor.steps(ds.paired(inputs, targets), samples_per_step=64)
        for micro in steps:
            if micro.first:
                in_step = []
            else:
                assert not reported or reported[-1] != micro.step or in_step
            if reported and reported[-1] == micro.step and not in_step:
                assert micro.first  # the failed step starts again from its beginning
            try:
                (cross_entropy(model, micro.data) * micro.weight).backward()
            except SimulatedOOM:
                optimizer.zero_grad()
                processor.report_oom()  # the processor finds the pass holding the batch
                reported.append(micro.step)
                in_step = []
                continue
            in_step.extend(micro.indices)
            if micro.last:
                assert sorted(in_step) == list(
                    range(64 * micro.step, 64 * micro.step + micro.step_samples)
                )
                contributed.extend(in_step)
                in_step = []
                optimizer.step()
                optimizer.zero_grad()
    assert sorted(contributed) == list(range(len(inputs)))
    assert len(reported) == len(model.failed_sizes) >= 2
    assert_same_parameters(model.net, reference)


def test_a_lone_sample_that_does_not_fit_is_an_error() -> None:
    inputs, targets = digits()

    def always_oom(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise SimulatedOOM("never fits")

    model = mlp()
    with (
        ds.DynamicBatchProcessor(max_batch_size=4, oom_errors=(SimulatedOOM,)) as processor,
        pytest.raises(ds.DynbatchError, match="alone does not fit"),
    ):
        processor.fit(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            always_oom,
            ds.paired(inputs[:8], targets[:8]),
            samples_per_step=8,
        )
