"""Training: epochs, shuffling with a seed, resuming from state_dict(), and bad input."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch

import dynbatch as ds
from dynbatch.training import epoch_order

from .training_models import assert_same_parameters, cross_entropy, digits, mlp

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def test_shuffle_visits_each_sample_once_per_epoch_in_a_seeded_order() -> None:
    inputs, targets = digits()
    data = ds.paired(inputs[:300], targets[:300])
    with ds.DynamicBatchProcessor(max_batch_size=16) as processor:
        micro = list(processor.steps(data, samples_per_step=50, epochs=3, shuffle=True, seed=5))
    orders: dict[int, list[int]] = {}
    for batch in micro:
        orders.setdefault(batch.epoch, []).extend(batch.indices)
    assert sorted(orders) == [0, 1, 2]
    for epoch, order in orders.items():
        assert sorted(order) == list(range(300))
        assert order == epoch_order(300, 5, epoch)
    assert orders[0] != orders[1]
    with ds.DynamicBatchProcessor(max_batch_size=64) as again:  # same seed, same order
        first_epoch = [
            i
            for batch in again.steps(data, samples_per_step=50, shuffle=True, seed=5)
            for i in batch.indices
        ]
    assert first_epoch == orders[0]
    # the micro-batches carry the samples they name
    for batch in micro[:5]:
        assert torch.equal(batch.data[1], targets[batch.indices])


def test_restored_job_continues_the_same_order() -> None:
    """Train 1.5 epochs, save, restore into a fresh processor, model and optimizer, finish:
    the parameters equal an uninterrupted run's."""
    inputs, targets = digits()
    data = ds.paired(inputs, targets)
    steps_per_epoch = math.ceil(len(inputs) / 64)

    reference = mlp()
    with ds.DynamicBatchProcessor(max_batch_size=32) as processor:
        processor.fit(
            reference,
            _adam(reference),
            cross_entropy,
            data,
            samples_per_step=64,
            epochs=2,
            shuffle=True,
            seed=11,
        )

    model = mlp()
    optimizer = _adam(model)
    with ds.DynamicBatchProcessor(max_batch_size=32) as processor:
        first = processor.fit(
            model,
            optimizer,
            cross_entropy,
            data,
            samples_per_step=64,
            epochs=2,
            shuffle=True,
            seed=11,
            max_steps=steps_per_epoch + steps_per_epoch // 2,
        )
        saved = {
            "processor": processor.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
    assert first.steps[-1].epoch == 1
    assert saved["processor"]["training"]["epoch"] == 1
    assert saved["processor"]["training"]["position"] == 64 * (steps_per_epoch // 2)

    restored = mlp(seed=99)  # different weights: the state must come back
    restored.load_state_dict(saved["model"])
    optimizer = _adam(restored)
    optimizer.load_state_dict(saved["optimizer"])
    with ds.DynamicBatchProcessor(max_batch_size=8) as processor:
        processor.load_state_dict(saved["processor"])
        rest = processor.fit(
            restored, optimizer, cross_entropy, data, samples_per_step=64, shuffle=True
        )
    assert rest.steps[0].step == steps_per_epoch + steps_per_epoch // 2
    assert rest.steps[-1].epoch == 1
    assert_same_parameters(restored, reference)


def test_restoring_onto_other_data_is_refused() -> None:
    inputs, targets = digits()
    model = mlp()
    with ds.DynamicBatchProcessor() as processor:
        processor.fit(
            model,
            _adam(model),
            cross_entropy,
            ds.paired(inputs, targets),
            samples_per_step=64,
            max_steps=2,
        )
        with pytest.raises(ValueError, match="is for data of 1797 samples, but this data has 100"):
            list(processor.steps(ds.paired(inputs[:100], targets[:100]), samples_per_step=64))
        with pytest.raises(ValueError, match="load_state_dict expects"):
            processor.load_state_dict({"epoch": 0})


# ------------------------------------------------------------------------------ bad input


def test_targets_not_matching_inputs_in_count() -> None:
    inputs, targets = digits()
    with pytest.raises(ValueError, match="inputs has 1797 samples but targets has 1796"):
        ds.paired(inputs, targets[:-1])
    with pytest.raises(TypeError, match="targets with a length"):
        ds.paired(inputs, iter(targets))


def test_a_loss_that_is_not_a_scalar() -> None:
    inputs, targets = digits()
    model = mlp()

    def per_sample(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    def not_a_tensor(model: torch.nn.Module, batch: Any) -> Any:
        return 1.0

    data = ds.paired(inputs[:64], targets[:64])
    with ds.DynamicBatchProcessor(max_batch_size=16) as processor:
        with pytest.raises(ValueError, match=r"scalar tensor, got one of shape \(\d+,\)"):
            processor.fit(model, _adam(model), per_sample, data, samples_per_step=32)
        with pytest.raises(TypeError, match="scalar tensor, got float"):
            processor.fit(model, _adam(model), not_a_tensor, data, samples_per_step=32)


def test_a_non_finite_loss_skips_the_step_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Steps 1 and 3 see a nan loss: they are skipped, the weights equal a run without them."""
    inputs, targets = digits()
    poisoned = {64, 200}  # in steps 1 and 3

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y, index = batch
        loss = cross_entropy(model, (x, y))
        if any(int(i) in poisoned for i in index):
            loss = loss * math.nan
        return loss

    reference = mlp()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step, start in enumerate(range(0, len(inputs), 64)):
        if step in (1, 3):
            continue
        optimizer.zero_grad()
        cross_entropy(
            reference, (inputs[start : start + 64], targets[start : start + 64])
        ).backward()
        optimizer.step()

    model = mlp()
    data = [(inputs[i], targets[i], i) for i in range(len(inputs))]
    with (
        caplog.at_level(logging.WARNING, logger="dynbatch"),
        ds.DynamicBatchProcessor(max_batch_size=16) as processor,
    ):
        result = processor.fit(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            loss_fn,
            data,
            samples_per_step=64,
        )
    assert result.skipped_steps == 2
    assert [step.step for step in result if step.skipped] == [1, 3]
    assert all(math.isnan(step.loss) for step in result if step.skipped)
    assert math.isfinite(result.final_loss)
    warnings = [r for r in caplog.records if "loss is nan" in r.getMessage()]
    assert len(warnings) == 1
    assert processor.state_dict()["training"]["skipped_steps"] == 2
    assert_same_parameters(model, reference)


def test_samples_per_step_below_min_batch_size() -> None:
    inputs, targets = digits()
    model = mlp()
    data = ds.paired(inputs, targets)
    with ds.DynamicBatchProcessor(min_batch_size=16) as processor:
        with pytest.raises(ValueError, match=r"samples_per_step \(8\) must be at least min_batch"):
            processor.fit(model, _adam(model), cross_entropy, data, samples_per_step=8)
        with pytest.raises(ValueError, match=r"samples_per_step \(8\) must be at least min_batch"):
            processor.steps(data, samples_per_step=8)
        with pytest.raises(ValueError, match="an int or 'auto', got 'fast'"):
            processor.fit(model, _adam(model), cross_entropy, data, samples_per_step="fast")
        with pytest.raises(TypeError, match="samples_per_step must be an int"):
            processor.steps(data, samples_per_step=6.4)  # type: ignore[arg-type]


def test_an_optimizer_that_does_not_own_the_models_parameters() -> None:
    inputs, targets = digits()
    model, other = mlp(), mlp()
    data = ds.paired(inputs, targets)
    with ds.DynamicBatchProcessor() as processor:
        with pytest.raises(ValueError, match="does not own the model's parameters"):
            processor.fit(model, _adam(other), cross_entropy, data, samples_per_step=32)
        partial = torch.optim.SGD(model[0].parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"does not own 2 of the model's 4 .* '2.weight'"):
            processor.fit(model, partial, cross_entropy, data, samples_per_step=32)
        with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
            processor.fit(model, "adam", cross_entropy, data, samples_per_step=32)
        with pytest.raises(TypeError, match="lr_scheduler must have a step"):
            processor.fit(
                model, _adam(model), cross_entropy, data, samples_per_step=32, lr_scheduler=3
            )
        with pytest.raises(ValueError, match="max_grad_norm must be positive"):
            processor.fit(
                model, _adam(model), cross_entropy, data, samples_per_step=32, max_grad_norm=0
            )
        with pytest.raises(ValueError, match="lr_scaling must be one of"):
            processor.fit(
                model, _adam(model), cross_entropy, data, samples_per_step=32, lr_scaling="cube"
            )
        with pytest.raises(TypeError, match="shuffle=True needs data with a length"):
            processor.steps(iter(data), samples_per_step=32, shuffle=True)
