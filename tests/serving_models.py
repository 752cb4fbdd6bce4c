"""Models for the serving tests: they record what they saw and can be held or made to fail."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch


def tag(value: int, width: int = 4) -> torch.Tensor:
    """A sample whose every element is its tag."""
    return torch.full((width,), float(value))


def tags_of(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].to(torch.int64).tolist()


class RecordingModel:
    """Identity-like model (returns tag * 10) that records each call's tags. ``hold()`` makes
    calls wait until ``release()``, so requests pile up behind a running batch."""

    def __init__(self, poison: set[int] | None = None, delay_s: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.poison = poison or set()
        self.delay_s = delay_s
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    @property
    def seen(self) -> list[int]:
        with self._lock:
            return [t for call in self.calls for t in call]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        tags = tags_of(batch)
        self.entered.set()
        self._gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.calls.append(tags)
        bad = self.poison.intersection(tags)
        if bad:
            raise ValueError(f"poisoned tags {sorted(bad)}")
        return batch[:, 0] * 10


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return bool(condition())
