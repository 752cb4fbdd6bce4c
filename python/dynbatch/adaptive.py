"""The adaptive step size (``samples_per_step="auto"``): goodput, the gradient noise scale and
learning-rate scaling.

Goodput is throughput times statistical efficiency (Pollux, OSDI'21). The efficiency of a
step of N samples against the base size N0 is ``(B + N0) / (B + N)``, where B is the gradient
noise scale ``tr(Sigma) / |G|^2`` (McCandlish et al. 2018): far below B, doubling N halves the
steps needed; far above it, a bigger step buys nothing. B is estimated from two batch sizes
that accumulation measures anyway: the step's first micro-batch (its gradient is alone in
``.grad`` after its backward) and the whole step, as gpt-neox does, each smoothed on its own.
Throughput comes from a step's measured costs by what they scale with: the optimizer's part
(clipping, ``optimizer.step()``, the scheduler) per step, the model's time per micro-batch
(the engine's learned ``a + b*n``) plus the loop's own time per micro-batch, and the time to
read, check and hand over each sample.
The step size is re-decided at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["LR_RULES", "AdaptiveSteps", "NoiseScale", "lr_factor"]

LR_RULES = ("adascale", "sqrt", "linear", None)

# Steps of the geometric grid the step size is chosen from, per doubling.
_GRID_PER_DOUBLING = 4
# A new size must promise this much more goodput than the current one (noise in the
# estimates would otherwise make the size wander).
_HYSTERESIS = 0.03
# Estimates before the noise scale is trusted: until then the step size stays at the base.
_WARMUP_ESTIMATES = 8


class NoiseScale:
    """The gradient noise scale from pairs of squared gradient norms at a small and a big
    batch size. The unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` (McCandlish et al.,
    appendix A) are each smoothed by an exponential moving average, bias-corrected."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self._sqr = 0.0  # EMA of |G|^2
        self._var = 0.0  # EMA of tr(Sigma)
        self.count = 0

    def observe(self, small: int, small_sqr: float, big: int, big_sqr: float) -> None:
        """``small_sqr``: ``|g|^2`` of the mean gradient of ``small`` samples; ``big_sqr`` of
        ``big`` samples (``small < big``)."""
        if not small < big or not (math.isfinite(small_sqr) and math.isfinite(big_sqr)):
            return
        sqr = (big * big_sqr - small * small_sqr) / (big - small)
        var = (small_sqr - big_sqr) / (1.0 / small - 1.0 / big)
        beta = self.smoothing
        self._sqr = beta * self._sqr + (1 - beta) * sqr
        self._var = beta * self._var + (1 - beta) * var
        self.count += 1

    @property
    def value(self) -> float | None:
        """B_simple in samples; None before the first estimate, and while the smoothed
        ``|G|^2`` is not positive (the gradient is lost in its noise: nothing to go by)."""
        if self.count == 0:
            return None
        correction = 1 - self.smoothing**self.count
        sqr, var = self._sqr / correction, self._var / correction
        if sqr <= 0:
            return None
        return max(var, 0.0) / sqr

    def state_dict(self) -> dict[str, float]:
        return {"sqr": self._sqr, "var": self._var, "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sqr = float(state.get("sqr", 0.0))
        self._var = float(state.get("var", 0.0))
        self.count = int(state.get("count", 0))


def lr_factor(rule: str | None, samples: int, base: int, noise_scale: float | None) -> float:
    """How much the learning rate tuned for ``base`` samples per step is scaled for a step of
    ``samples``: AdaScale's gain ``(s2 + m2) / (s2 / S + m2)`` with ``S = samples / base`` and
    ``s2 / m2 = B / base`` (1 until the noise scale is known), the square-root or linear rule,
    or 1 (None)."""
    scale = samples / base
    if rule is None:
        return 1.0
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if noise_scale is None:
        return 1.0
    if math.isinf(noise_scale):
        return scale
    ratio = noise_scale / base
    return (ratio + 1.0) / (ratio / scale + 1.0)


class AdaptiveSteps:
    """Chooses each step's size in ``[low, high]`` by predicted goodput.

    ``micro_cost`` gives the engine's learned micro-batch cost (intercept ns, ns per sample)
    and the largest micro-batch it forms now, or None while it has not learned them.
    """

    def __init__(
        self,
        base: int,
        low: int,
        high: int,
        micro_cost: Callable[[], tuple[float, float, int] | None],
        smoothing: float = 0.95,
        world_size: int = 1,
    ) -> None:
        self.base = base
        self.world_size = world_size
        self.low = low
        self.high = high
        self._micro_cost = micro_cost
        self.noise = NoiseScale(smoothing)
        self.current = min(max(base, low), high)
        # EMAs of the optimizer's time per step, the loop's time per micro-batch outside the
        # model, and the reading time per sample (of the step, over all ranks)
        self._fixed_ns = 0.0
        self._per_micro_ns = 0.0
        self._per_sample_ns = 0.0
        self._observed = 0
        grid = {low, high, self.current}
        size = float(low)
        while size < high:
            grid.add(round(size))
            size *= 2 ** (1 / _GRID_PER_DOUBLING)
        self._grid = sorted(n for n in grid if low <= n <= high)

    def observe_step(
        self,
        samples: int,
        micro_batches: int,
        *,
        wall_ns: float,
        compute_ns: float,
        optimizer_ns: float,
        read_ns: float,
    ) -> None:
        """A step's wall time split by what each part scales with: its micro-batches' time in
        the model (forward and backward), its optimizer's part, the time spent reading its
        samples; the rest is the loop's own time per micro-batch."""
        beta = 0.8 if self._observed else 0.0
        loop = max(wall_ns - compute_ns - optimizer_ns - read_ns, 0.0) / max(micro_batches, 1)
        self._fixed_ns = beta * self._fixed_ns + (1 - beta) * max(optimizer_ns, 0.0)
        self._per_micro_ns = beta * self._per_micro_ns + (1 - beta) * loop
        self._per_sample_ns = beta * self._per_sample_ns + (1 - beta) * read_ns / samples
        self._observed += 1

    def step_seconds(
        self, samples: int, cost: tuple[float, float, int] | None = None
    ) -> float | None:
        """Predicted wall time of a step of ``samples``; None while the costs are unknown.
        ``cost``: the engine's micro-batch cost, when the caller has it already."""
        if cost is None:
            cost = self._micro_cost()
        if cost is None or self._observed == 0:
            return None
        intercept_ns, slope_ns, micro = cost
        micro_batches = math.ceil(samples / self.world_size / max(micro, 1))
        return (
            self._fixed_ns
            + micro_batches * (intercept_ns + self._per_micro_ns)
            + samples * (self._per_sample_ns + slope_ns / self.world_size)
        ) * 1e-9

    def goodput(self, samples: int, cost: tuple[float, float, int] | None = None) -> float | None:
        """Predicted samples per second times statistical efficiency (against the base)."""
        seconds = self.step_seconds(samples, cost)
        noise = self.noise.value
        if seconds is None or seconds <= 0 or noise is None:
            return None
        efficiency = 1.0 if math.isinf(noise) else (noise + self.base) / (noise + samples)
        return samples / seconds * efficiency

    def decide(self) -> int:
        """The next step's size (the current one until the estimates are in)."""
        if self.noise.count < _WARMUP_ESTIMATES:
            return self.current
        cost = self._micro_cost()  # once per decision: it is read from the core
        current = self.goodput(self.current, cost)
        if current is None:
            return self.current
        best, best_goodput = self.current, current
        for size in self._grid:
            value = self.goodput(size, cost)
            if value is not None and value > best_goodput:
                best, best_goodput = size, value
        if best_goodput > current * (1 + _HYSTERESIS):
            self.current = best
        return self.current

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "fixed_ns": self._fixed_ns,
            "per_micro_ns": self._per_micro_ns,
            "per_sample_ns": self._per_sample_ns,
            "observed": self._observed,
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.current = min(max(int(state.get("current", self.current)), self.low), self.high)
        self._fixed_ns = float(state.get("fixed_ns", 0.0))
        self._per_micro_ns = float(state.get("per_micro_ns", 0.0))
        self._per_sample_ns = float(state.get("per_sample_ns", 0.0))
        self._observed = int(state.get("observed", 0))
        self.noise.load_state_dict(state.get("noise", {}))
