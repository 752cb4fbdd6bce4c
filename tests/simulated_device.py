"""A simulated device: a fake model whose time is a + b*n and whose memory is m0 + m1*n,
raising an out-of-memory error when that exceeds the free memory, on a fake clock; optionally
with timing noise (each call's time multiplied by 1 + noise * z, z normal, from a seed)."""

from __future__ import annotations

import math
import random

import torch

from dynbatch import _core


class SimulatedOOM(RuntimeError):
    """The simulated device ran out of memory."""


class SimulatedDevice:
    """Clock, telemetry, memory monitor and model of one simulated accelerator.

    Samples are tagged tensors (column 0 holds the sample's index); ``runs`` records the tags
    of every successful model call, so tests can check that each sample ran exactly once.
    """

    def __init__(
        self,
        *,
        a_s: float,
        b_s: float,
        m0: int,
        m1: int,
        capacity: int,
        report_memory: bool = True,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.a_ns, self.b_ns = int(a_s * 1e9), int(b_s * 1e9)
        self.m0, self.m1, self.capacity = m0, m1, capacity
        self.report_memory = report_memory
        self.noise = noise
        self._random = random.Random(seed)
        self.used_by_others = 0
        self.now_ns = 0
        self.last_peak = 0
        self.runs: list[list[int]] = []
        self.ooms: list[int] = []
        self.telemetry = _core.Telemetry.scripted(capacity, capacity, period_s=3600.0)

    @property
    def free(self) -> int:
        return self.capacity - self.used_by_others

    def knee(self, tolerance: float = 0.05) -> int:
        """Where n / L(n) comes within ``tolerance`` of its ceiling 1/b."""
        return math.ceil((1 - tolerance) * self.a_ns / (tolerance * self.b_ns))

    def best_size(self) -> int:
        """The largest batch that fits now."""
        return (self.free - self.m0) // self.m1

    def take_memory(self, nbytes: int) -> None:
        """Another process takes (or, negative, frees) device memory."""
        self.used_by_others += nbytes
        self.telemetry.set_scripted(self.capacity, self.free)

    def clock(self) -> int:
        return self.now_ns

    def begin(self) -> None:
        self.last_peak = 0

    def end(self) -> tuple[int, int]:
        return (self.last_peak if self.report_memory else 0, 0)

    def model(self, batch: torch.Tensor) -> torch.Tensor:
        size = len(batch)
        if self.m0 + self.m1 * size > self.free:
            self.now_ns += self.a_ns  # the failed attempt still costs time
            self.ooms.append(size)
            raise SimulatedOOM(f"batch of {size} needs {self.m0 + self.m1 * size} bytes")
        factor = max(0.05, 1.0 + self.noise * self._random.gauss()) if self.noise else 1.0
        self.now_ns += round((self.a_ns + self.b_ns * size) * factor)
        self.last_peak = self.m0 + self.m1 * size
        tags = batch[:, 0].to(torch.int64)
        self.runs.append(tags.tolist())
        return tags * 10


def tagged_samples(count: int) -> list[torch.Tensor]:
    return [torch.tensor([float(i), 0.0, 1.0]) for i in range(count)]
