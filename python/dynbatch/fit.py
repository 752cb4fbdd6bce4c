"""The training loop that owns the step: ``processor.fit(model, optimizer, loss_fn, data)``.

It drives a ``StepIterator``: forward and backward on each micro-batch (the mean loss scaled
by the micro-batch's share of the step), ``optimizer.step()`` after the step's last one.
Gradient clipping, an LR scheduler, ``torch.amp.GradScaler`` and DistributedDataParallel
(gradients synchronised on a step's last micro-batch only) fit in where a hand-written loop
puts them. An out-of-memory error zeroes the gradients and runs the step again in smaller
micro-batches; a non-finite loss skips the step. With ``samples_per_step="auto"`` the step
size follows goodput and the learning rate is scaled for it (``adaptive.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .adaptive import LR_RULES, AdaptiveSteps, lr_factor
from .engine import Engine
from .logs import logger
from .training import (
    MicroBatch,
    StepIterator,
    StepPlan,
    TrainingState,
    check_step_size,
    open_pass,
)

__all__ = ["FitResult", "StepMetrics", "Trainer"]

# Under "auto", a step that would be one micro-batch is split in two every this many steps,
# so that the noise scale keeps being measured (a step of several micro-batches always is).
_MEASURE_EVERY = 4


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step of ``fit``.

    Attributes:
        step: its index over the whole run; epoch: its epoch.
        samples: samples in the step (all ranks); micro_batches: this rank's micro-batches.
        loss: the step's mean loss (all ranks); nan for a skipped step.
        lr: the learning rate of the optimizer's first parameter group used for the step
            (after scaling, under "auto").
        samples_per_second: the step's samples over its wall time.
        skipped: the loss was not finite: no optimizer step was taken.
        retries: times the step was run again after running out of memory.
        noise_scale: the smoothed gradient noise scale after the step (under "auto").
    """

    step: int
    epoch: int
    samples: int
    micro_batches: int
    loss: float
    lr: float
    samples_per_second: float
    skipped: bool = False
    retries: int = 0
    noise_scale: float | None = None


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` did: one ``StepMetrics`` per optimizer step, and totals."""

    steps: list[StepMetrics]
    seconds: float
    skipped_steps: int
    oom_retries: int

    @property
    def samples(self) -> int:
        """Samples trained on (all ranks)."""
        return sum(step.samples for step in self.steps)

    @property
    def samples_per_second(self) -> float:
        """Samples over the call's wall time."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_samples_per_step(self) -> float:
        """The mean step size (the effective batch)."""
        return self.samples / len(self.steps) if self.steps else 0.0

    @property
    def final_loss(self) -> float:
        """The last step's loss that was finite (nan when none was)."""
        for step in reversed(self.steps):
            if not step.skipped:
                return step.loss
        return math.nan

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[StepMetrics]:
        return iter(self.steps)


def _check_fit_arguments(
    model: object,
    optimizer: object,
    loss_fn: object,
    *,
    max_grad_norm: object,
    lr_scheduler: object,
    grad_scaler: object,
    lr_scaling: object,
    on_step: object = None,
) -> None:
    """Clear errors for arguments ``fit`` cannot use, before anything runs."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fit needs a torch.nn.Module as model, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"fit needs a torch.optim.Optimizer as optimizer, got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if id(p) not in owned]
    if trainable and len(missing) == len(trainable):
        raise ValueError(
            "the optimizer does not own the model's parameters (none of its "
            f"{len(trainable)} trainable parameters is in optimizer.param_groups): build the "
            "optimizer from model.parameters()"
        )
    if missing:
        raise ValueError(
            f"the optimizer does not own {len(missing)} of the model's {len(trainable)} "
            f"trainable parameters (e.g. {missing[0]!r}): pass them to the optimizer or set "
            "requires_grad=False"
        )
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
            raise TypeError(f"max_grad_norm must be a number, got {type(max_grad_norm).__name__}")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
    if lr_scheduler is not None and not callable(getattr(lr_scheduler, "step", None)):
        raise TypeError(
            f"lr_scheduler must have a step() method, got {type(lr_scheduler).__name__}"
        )
    if grad_scaler is not None and not all(
        callable(getattr(grad_scaler, name, None)) for name in ("scale", "unscale_", "update")
    ):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable, got {type(on_step).__name__}")
    if lr_scaling not in LR_RULES:
        raise ValueError(
            f"lr_scaling must be one of {', '.join(map(repr, LR_RULES))}, got {lr_scaling!r}"
        )


def _distributed_model(model: torch.nn.Module) -> Any:
    """The model when it is a DistributedDataParallel wrapper, else None."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return model if ddp is not None and isinstance(model, ddp) else None


class Trainer:
    """One ``fit`` call: the step plan (fixed, or adaptive) and the loop over a
    ``StepIterator`` built with it."""

    def __init__(
        self,
        engine: Engine,
        state: TrainingState,
        model: Any,
        optimizer: Any,
        loss_fn: Callable[[Any, Any], Any],
        *,
        samples_per_step: int | str,
        length: int | None,
        base_samples_per_step: int,
        max_samples_per_step: int | None,
        lr_scaling: str | None,
        max_grad_norm: float | None,
        lr_scheduler: Any,
        grad_scaler: Any,
        on_step: Callable[[StepMetrics], object] | None = None,
    ) -> None:
        _check_fit_arguments(
            model,
            optimizer,
            loss_fn,
            max_grad_norm=max_grad_norm,
            lr_scheduler=lr_scheduler,
            grad_scaler=grad_scaler,
            lr_scaling=lr_scaling,
            on_step=on_step,
        )
        fixed: int | None
        if samples_per_step == "auto":
            fixed = None
            base = check_step_size(engine, base_samples_per_step, "base_samples_per_step")
            high = max_samples_per_step
            if high is None:  # 32 times the base, at most the data
                high = max(base, min(32 * base, length or 32 * base))
            high = check_step_size(engine, high, "max_samples_per_step")
            if high < base:
                raise ValueError(
                    f"max_samples_per_step ({high}) must be at least base_samples_per_step ({base})"
                )
        else:
            if isinstance(samples_per_step, str):
                raise ValueError(
                    f"samples_per_step must be an int or 'auto', got {samples_per_step!r}"
                )
            fixed = check_step_size(engine, samples_per_step)
            base = high = fixed
        self.max_samples_per_step = high
        self._engine = engine
        engine.note_model(model)
        self._on_step = on_step
        self._state = state
        self._model = model
        self._optimizer = optimizer
        self._loss_fn = loss_fn
        self._fixed = fixed
        self._base = base
        self._lr_scaling = lr_scaling
        self._max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._scheduler = lr_scheduler
        self._scaler = grad_scaler
        self._ddp = _distributed_model(model)
        self.group: Any = None
        self.rank, self.world_size = 0, 1
        if self._ddp is not None:
            import torch.distributed as dist

            self.group = self._ddp.process_group
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
        self.adaptive: AdaptiveSteps | None = None
        # Planning broadcasts rank 0's decision: every rank must plan at the same point of
        # its step, not ahead (DDP's own collectives in forward would interleave otherwise).
        self.plans_ahead = fixed is not None or self.world_size == 1
        if fixed is None:
            self.adaptive = AdaptiveSteps(
                base, base, high, engine.batch_cost, world_size=self.world_size
            )
            self.adaptive.load_state_dict(state.adaptive)
        # the noise scale each step was planned with (steps are planned one ahead)
        self._planned_noise: dict[int, float | None] = {}
        self._measured: set[int] = set()  # steps whose first micro-batch measures the noise
        self._planned = 0

    def open(
        self,
        data: Iterable[Any],
        *,
        epochs: int,
        shuffle: bool,
        seed: int | None,
        drop_last: bool,
        max_steps: int | None,
        progress: bool,
    ) -> StepIterator:
        """The pass ``run`` drives: this trainer's plan, shared among its ranks."""
        return open_pass(
            self._engine,
            self._state,
            data,
            self.plan,
            self.max_samples_per_step,
            epochs=epochs,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            max_steps=max_steps,
            rank=self.rank,
            world_size=self.world_size,
            progress=progress,
            ahead=self.plans_ahead,
        )

    def plan(self, step: int) -> StepPlan:
        """Step ``step``'s size (and, under "auto", whether its first micro-batch is kept
        small enough to measure the gradient noise)."""
        if self.adaptive is None:
            assert self._fixed is not None
            return StepPlan(self._fixed)
        size = self.adaptive.decide()
        noise = self.adaptive.noise.value
        if self.world_size > 1:  # every rank takes rank 0's decision
            import torch.distributed as dist

            device = next(self._model.parameters()).device
            decision = torch.tensor(
                [float(size), -1.0 if noise is None else noise], dtype=torch.float64, device=device
            )
            dist.broadcast(decision, dist.get_global_rank(self.group, 0), group=self.group)
            size = int(decision[0].item())
            noise = None if decision[1].item() < 0 else float(decision[1].item())
            self.adaptive.current = size
        self._planned_noise[step] = noise
        cost = self._engine.batch_cost()
        natural_split = cost is not None and cost[2] < -(-size // self.world_size)
        measuring = size >= 2 and (natural_split or self._planned % _MEASURE_EVERY == 0)
        self._planned += 1
        if measuring:
            self._measured.add(step)
        first_limit = None if natural_split or not measuring else max(1, size // 4)
        return StepPlan(size, first_limit)

    def run(self, steps: StepIterator) -> FitResult:
        engine = self._engine
        optimizer = self._optimizer
        clock = engine.clock
        results: list[StepMetrics] = []
        started = time.perf_counter()
        step_started = time.perf_counter_ns()
        oom_retries = 0
        retries = 0
        compute_ns = 0
        micro_batches = 0
        loss_sum: torch.Tensor | None = None
        small: tuple[int, float] | None = None
        read_ns = 0
        with contextlib.closing(steps):
            for batch in steps:
                if batch.first:
                    optimizer.zero_grad(set_to_none=True)
                    compute_ns, micro_batches, loss_sum, small = 0, 0, None, None
                began = clock()
                try:
                    loss = self._forward_backward(batch)
                except engine.oom_types:
                    optimizer.zero_grad(set_to_none=True)
                    steps.report_oom()
                    oom_retries += 1
                    retries += 1
                    continue
                spent = clock() - began
                steps.note_compute(spent)
                compute_ns += spent
                micro_batches += 1
                weighted = loss.detach() * batch.weight
                loss_sum = weighted if loss_sum is None else loss_sum + weighted
                if batch.first and not batch.last and batch.step in self._measured:
                    small = (batch.size, self._grad_sqr() / self._grad_scale(batch.weight))
                if not batch.last:
                    continue
                assert loss_sum is not None
                finishing = time.perf_counter_ns()
                metrics = self._finish_step(batch, loss_sum, small, micro_batches, retries)
                now = time.perf_counter_ns()
                wall_ns = max(now - step_started, 1)
                step_started = now
                retries = 0
                if self.adaptive is not None:
                    if results:  # a pass's first step also pays for starting it
                        self.adaptive.observe_step(
                            batch.step_samples,
                            micro_batches,
                            wall_ns=wall_ns,
                            compute_ns=compute_ns,
                            optimizer_ns=now - finishing,
                            read_ns=steps.read_ns - read_ns,
                        )
                    read_ns = steps.read_ns
                    self._state.adaptive = self.adaptive.state_dict()
                step_metrics = StepMetrics(
                    step=batch.step,
                    epoch=batch.epoch,
                    samples=batch.step_samples,
                    micro_batches=micro_batches,
                    loss=metrics[0],
                    lr=metrics[1],
                    samples_per_second=batch.step_samples / (wall_ns * 1e-9),
                    skipped=metrics[2],
                    retries=metrics[3],
                    noise_scale=None if self.adaptive is None else self.adaptive.noise.value,
                )
                results.append(step_metrics)
                if self._on_step is not None and self._on_step(step_metrics) is True:
                    break
                step_started = time.perf_counter_ns()  # the callback's time is its own
        return FitResult(
            results,
            time.perf_counter() - started,
            sum(1 for step in results if step.skipped),
            oom_retries,
        )

    def _forward_backward(self, batch: MicroBatch) -> torch.Tensor:
        """The micro-batch's mean loss, its scaled gradient accumulated into ``.grad``."""
        sync = self._ddp is None or batch.last
        with contextlib.nullcontext() if sync else self._ddp.no_sync():
            loss = self._loss_fn(self._model, batch.data)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    "loss_fn must return the batch's mean loss as a scalar tensor, got "
                    f"{type(loss).__name__}"
                )
            if loss.dim() != 0:
                raise ValueError(
                    "loss_fn must return the batch's mean loss as a scalar tensor, got one of "
                    f"shape {tuple(loss.shape)} (reduce it with .mean())"
                )
            if not loss.requires_grad:
                raise ValueError(
                    "loss_fn returned a loss that does not require grad: compute it from the "
                    "model's output, outside torch.no_grad()"
                )
            scaled = loss * batch.weight
            if self._scaler is not None:
                scaled = self._scaler.scale(scaled)
            scaled.backward()  # type: ignore[no-untyped-call]
        return loss

    def _finish_step(
        self,
        batch: MicroBatch,
        loss_sum: torch.Tensor,
        small: tuple[int, float] | None,
        micro_batches: int,
        retries: int,
    ) -> tuple[float, float, bool, int]:
        """Clipping, measuring, the optimizer and scheduler steps: (loss, lr, skipped,
        retries)."""
        optimizer = self._optimizer
        if self._ddp is not None:  # the step's loss over all ranks; nan anywhere skips it
            import torch.distributed as dist

            loss_sum = loss_sum.detach().clone()
            dist.all_reduce(loss_sum, group=self.group)
            loss_sum /= self.world_size
        loss = float(loss_sum)
        factor = 1.0
        if self.adaptive is not None:  # for the step's real size (an epoch's last may be short)
            noise = self._planned_noise.pop(batch.step, None)
            self._measured.discard(batch.step)
            factor = lr_factor(self._lr_scaling, batch.step_samples, self._base, noise)
        lr = float(optimizer.param_groups[0]["lr"]) * factor
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            self._state.skipped_steps += 1
            if not self._state.warned_nonfinite:
                self._state.warned_nonfinite = True
                logger.warning(
                    "step %d: the loss is %s; the step is skipped (its gradients dropped, the "
                    "weights untouched); later non-finite steps are counted in "
                    "FitResult.skipped_steps without a warning",
                    batch.step,
                    loss,
                )
            return math.nan, lr, True, retries
        scaler = self._scaler
        measure = self.adaptive is not None and small is not None
        if scaler is not None and (self._max_grad_norm is not None or measure):
            scaler.unscale_(optimizer)
        if measure:
            assert self.adaptive is not None and small is not None
            big_sqr = self._grad_sqr()
            self.adaptive.noise.observe(small[0], small[1], batch.step_samples, big_sqr)
        if self._max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._max_grad_norm)
        saved = [group["lr"] for group in optimizer.param_groups]
        if factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
        try:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        finally:
            for group, value in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = value
        if self._scheduler is not None:
            self._scheduler.step()
        return loss, lr, False, retries

    def _grad_sqr(self) -> float:
        """The squared norm of the accumulated gradient."""
        squares = [
            p.grad.detach().float().pow(2).sum()
            for p in self._model.parameters()
            if p.grad is not None
        ]
        return float(torch.stack(squares).sum()) if squares else 0.0

    def _grad_scale(self, weight: float) -> float:
        """What the squared norm of one micro-batch's gradient in ``.grad`` is multiplied
        by: its weight (and the grad scaler's scale), squared."""
        scale = weight
        if self._scaler is not None:
            scale *= float(self._scaler.get_scale())
        return scale * scale
