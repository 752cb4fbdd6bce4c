"""Scheduler: several tasks (processors with their own models) sharing one device."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from . import _core, grants
from .devices import nvml_index_of_device
from .errors import ProcessorForked

__all__ = ["Scheduler"]

# A waiting worker looks this often whether its processor was closed without draining.
_GIVE_UP_CHECK_S = 0.05
_registry_lock = threading.Lock()
_shared: dict[str, Scheduler] = {}
_task_ids = itertools.count(1)


def _forget_shared_after_fork() -> None:
    """A forked child makes its own shared schedulers: the parent's hold the parent's grants
    (and their lock may be held by a thread that does not exist here)."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _shared.clear()


os.register_at_fork(after_in_child=_forget_shared_after_fork)


def _device_name(device: str | torch.device | None) -> str:
    if device is None:
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    if parsed.type == "cuda":
        index = parsed.index if parsed.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    if parsed.type != "cpu":
        raise ValueError(f"Scheduler supports cpu and cuda devices, got {device!r}")
    return "cpu"


class Scheduler:
    """Runs the batches of several processors on one device, in order of task priority.

    Every processor built with ``model=`` runs each batch under a grant from its scheduler:
    the one passed as ``scheduler=``, or the device's shared one (``Scheduler.shared()``).
    When batches of several tasks wait, the one with the largest ``task_priority`` runs first;
    a waiting batch gains one priority level per ``aging_ms`` waited, so a low-priority task
    is slowed by a busy high-priority one, never starved. A task whose worker releases the
    device with more work queued keeps it while the worker finishes that batch and asks for
    the next (a hold): a lower-priority task does not slip in between two batches of a
    backlogged higher one. The hold lasts four times the task's longest recent gap between
    a release and its next ask, at most ``max_hold_ms``, and ranks with aging like any waiter.

    A model that waits for another processor's result (a pipeline of processors) lends its
    grant while it waits, so the inner processor can run on the same scheduler.

    ``concurrency`` batches may run at once (default 1: one at a time). Then each batch
    reserves the peak memory its processor's learned memory model predicts for its size, and
    batches run together only while their reservations fit the device's free memory (minus
    ``memory_margin``, a fraction of the total) read when the device was idle; a task whose
    memory cost is not known yet runs alone.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: the current CUDA device, else
            the CPU). Memory readings come from NVML for a GPU, host memory otherwise.
        concurrency: batches allowed to run at once.
        aging_ms: waiting time that raises a batch's priority by one level.
        memory_margin: fraction of the device's total memory never reserved.
        max_hold_ms: the longest a backlogged task keeps the device between two of its
            batches (0: no holds; any waiting task may take the device in that gap).
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        concurrency: int = 1,
        aging_ms: float = 100.0,
        memory_margin: float = 0.05,
        max_hold_ms: float = 50.0,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if isinstance(aging_ms, bool) or not isinstance(aging_ms, (int, float)):
            raise TypeError(f"aging_ms must be a number, got {type(aging_ms).__name__}")
        if not 0.0 < aging_ms <= 3.6e6:
            raise ValueError(f"aging_ms must be in (0, 3600000], got {aging_ms}")
        if isinstance(memory_margin, bool) or not isinstance(memory_margin, (int, float)):
            raise TypeError(f"memory_margin must be a number, got {type(memory_margin).__name__}")
        if not 0.0 <= memory_margin < 1.0:
            raise ValueError(f"memory_margin must be in [0, 1), got {memory_margin}")
        if isinstance(max_hold_ms, bool) or not isinstance(max_hold_ms, (int, float)):
            raise TypeError(f"max_hold_ms must be a number, got {type(max_hold_ms).__name__}")
        if not 0.0 <= max_hold_ms <= 3.6e6:
            raise ValueError(f"max_hold_ms must be in [0, 3600000], got {max_hold_ms}")
        self.device = _device_name(device)
        self.concurrency = concurrency
        nvml_index = -1
        if self.device.startswith("cuda"):
            nvml_index = nvml_index_of_device(int(self.device.split(":")[1]))
        self._telemetry = _core.Telemetry.auto(nvml_index, 0.05)
        self._core = _core.DeviceScheduler(
            concurrency, float(aging_ms), float(memory_margin), self._telemetry, float(max_hold_ms)
        )
        self._closed = False
        self._pid = os.getpid()
        self._fork_generation = _core.fork_generation()

    @classmethod
    def shared(cls, device: str | torch.device | None = None) -> Scheduler:
        """The device's shared scheduler (created on first use, one per device)."""
        name = _device_name(device)
        with _registry_lock:
            scheduler = _shared.get(name)
            if scheduler is None or scheduler._closed:
                scheduler = cls(name)
                _shared[name] = scheduler
            return scheduler

    @staticmethod
    def new_task_id() -> int:
        """A fresh task id, for work of your own that takes grants with ``acquire``."""
        return next(_task_ids)

    def acquire(
        self,
        task: int,
        task_priority: int,
        reservation_bytes: int,
        give_up: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Waits for the batch's turn (the GIL is released only when it must wait); False
        when the scheduler is closed or ``give_up()`` turns true while waiting.

        The grant is this thread's until ``release``: while the thread waits for another
        processor's result it is lent (see the class). A thread that already holds this
        scheduler's only grant gets a ``RuntimeError``: a second one would never come."""
        if self._fork_generation != _core.fork_generation():
            raise ProcessorForked(
                f"this Scheduler belongs to the parent process (pid {self._pid}): it was "
                "created before fork(); create a new one in this process"
            )
        if self.concurrency == 1:
            for grant in grants.held():
                if grant.owner is self and not grant.lent:
                    raise RuntimeError(
                        f"{self!r}: this thread already holds the scheduler's only grant "
                        f"(task {grant.key[0]}); waiting for another would never end"
                    )
        since = _core.now_ns()  # keeps the batch's age across the slices of the wait
        if not self._wait_for_grant(task, task_priority, reservation_bytes, give_up, since):
            return False
        key = (task, task_priority, reservation_bytes)
        grants.hold(
            grants.Grant(
                self,
                key,
                lambda: self._core.release(task, task_priority, reservation_bytes),
                lambda: self._wait_for_grant(
                    task, task_priority, reservation_bytes, give_up, since
                ),
            )
        )
        return True

    def _wait_for_grant(
        self,
        task: int,
        task_priority: int,
        reservation_bytes: int,
        give_up: Callable[[], bool],
        since: int,
    ) -> bool:
        if self._core.try_acquire(task, task_priority, reservation_bytes):
            return True
        while not give_up():
            if self._core.acquire(task, task_priority, reservation_bytes, _GIVE_UP_CHECK_S, since):
                return True
            if self._closed:
                return False
        return False

    def release(
        self, task: int, task_priority: int, reservation_bytes: int, *, more: bool = False
    ) -> None:
        """Ends a grant from ``acquire`` (the same arguments), once the batch is done.
        ``more``: the task has another batch queued, so it keeps the device for it a while
        (a hold; see the class)."""
        grant = grants.take(self, (task, task_priority, reservation_bytes))
        if grant is not None and grant.lent:
            return  # lent for a wait and never taken back: nothing to release
        self._core.release(task, task_priority, reservation_bytes, more)

    def state(self) -> dict[str, Any]:
        """Running and waiting batches, reserved bytes and budget, grants per task id."""
        return dict(self._core.state())

    def close(self) -> None:
        """Fails every waiting grant; processors using it fail their batches after that."""
        if self._closed:
            return
        self._closed = True
        if self._fork_generation == _core.fork_generation():  # else the parent's: left alone
            self._core.close()
        self._telemetry.close()

    def __repr__(self) -> str:
        return f"Scheduler(device={self.device!r}, concurrency={self.concurrency})"
