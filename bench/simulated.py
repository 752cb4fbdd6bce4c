"""A simulated accelerator for the sizing benchmarks (deterministic, CPU).

Same semantics as ``tests/simulated_device.py``: a batch of ``n`` takes ``a + b*n`` seconds of
a fake clock and needs ``m0 + m1*n`` bytes; above the free memory the call raises
``SimulatedOOM`` after ``a`` seconds (a failed attempt still costs its launch). Samples are
tagged tensors (column 0 holds the sample's index) and the model returns ``10 * tag``, so every
output can be checked against its sample.

Timing noise (``noise`` > 0): each call's time is multiplied by ``1 + noise * z``, z standard
normal from ``seed``, as on a busy host.

Added for the benchmarks: a log of every call (start time, size, success, phase "trial" or
"run") to measure OOMs, discarded work and the time to the steady size; and a capacity drop
(another process takes ``drop_bytes`` when the first batch holding sample ``drop_at`` or later
starts), scripted into the telemetry at that moment, so no approach is told in advance.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from dynbatch import _core

GIB = 2**30
MIB = 2**20


class SimulatedOOM(RuntimeError):
    """The simulated device ran out of memory."""


@dataclass(frozen=True)
class Call:
    start_ns: int
    size: int
    ok: bool
    phase: str  # "run": the approach's real pass; "trial": a search whose outputs are dropped


@dataclass(frozen=True)
class DeviceSpec:
    """Latency a + b*n (seconds), peak memory m0 + m1*n (bytes), capacity (bytes)."""

    a_s: float
    b_s: float
    m0: int
    m1: int
    capacity: int
    drop_bytes: int = 0  # taken by another process mid-run (0: no drop)
    drop_fraction: float = 0.3  # ... when the run first reaches this share of the samples
    noise: float = 0.0  # relative standard deviation of each call's time
    seed: int = 0

    def knee(self, tolerance: float = 0.05) -> int:
        """Where n / L(n) comes within ``tolerance`` of its ceiling 1/b."""
        return math.ceil((1 - tolerance) * self.a_s / (tolerance * self.b_s))


class SimulatedDevice:
    """Clock, telemetry, memory monitor and model of one simulated accelerator."""

    def __init__(self, spec: DeviceSpec, samples: int) -> None:
        self.spec = spec
        self.a_ns, self.b_ns = round(spec.a_s * 1e9), round(spec.b_s * 1e9)
        self.m0, self.m1, self.capacity = spec.m0, spec.m1, spec.capacity
        self.drop_at = int(spec.drop_fraction * samples) if spec.drop_bytes else None
        self.drop_ns: int | None = None
        self.used_by_others = 0
        self.now_ns = 0
        self.last_peak = 0
        self.phase = "run"
        self.calls: list[Call] = []
        self.executions = 0  # samples computed successfully, every phase
        self._random = random.Random(spec.seed)
        self.telemetry = _core.Telemetry.scripted(spec.capacity, spec.capacity, period_s=3600.0)

    @property
    def free(self) -> int:
        return self.capacity - self.used_by_others

    def best_size(self) -> int:
        """The largest batch that fits now."""
        return (self.free - self.m0) // self.m1

    @property
    def ooms(self) -> int:
        return sum(not call.ok for call in self.calls)

    def take_memory(self, nbytes: int) -> None:
        """Another process takes (or, negative, frees) device memory."""
        self.used_by_others += nbytes
        self.telemetry.set_scripted(self.capacity, self.free)

    # The processor's injected clock and memory monitor.
    def clock(self) -> int:
        return self.now_ns

    def begin(self) -> None:
        self.last_peak = 0

    def end(self) -> tuple[int, int]:
        return (self.last_peak, 0)

    def model(self, batch: torch.Tensor) -> torch.Tensor:
        size = len(batch)
        tags = batch[:, 0].to(torch.int64)
        if self.drop_at is not None and self.drop_ns is None and int(tags[-1]) >= self.drop_at:
            self.drop_ns = self.now_ns
            self.take_memory(self.spec.drop_bytes)
        start = self.now_ns
        if self.m0 + self.m1 * size > self.free:
            self.now_ns += self.a_ns
            self.calls.append(Call(start, size, False, self.phase))
            raise SimulatedOOM(f"batch of {size} needs {self.m0 + self.m1 * size} bytes")
        noise = self.spec.noise
        factor = max(0.05, 1.0 + noise * self._random.gauss()) if noise else 1.0
        self.now_ns += round((self.a_ns + self.b_ns * size) * factor)
        self.last_peak = self.m0 + self.m1 * size
        self.calls.append(Call(start, size, True, self.phase))
        self.executions += size
        return tags * 10


def tagged_samples(count: int) -> list[torch.Tensor]:
    return [torch.tensor([float(i), 0.0, 1.0]) for i in range(count)]
