"""The batch-sizing approaches the sizing benchmarks compare, and how a pass is scored.

Each approach runs one inference pass of ``device.model`` over tagged samples on a
``SimulatedDevice`` and returns the per-sample outputs it delivered plus the error that ended
it, if any (a plain loop has no recovery: its first out-of-memory error ends the pass, and the
outputs it collected so far are what the caller keeps).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from simulated import SimulatedDevice, SimulatedOOM

import dynbatch as ds

Model = Callable[[torch.Tensor], torch.Tensor]
Approach = Callable[[SimulatedDevice, list[torch.Tensor]], tuple[list[torch.Tensor], str | None]]

FIXED_SIZES = (8, 16, 32, 64, 128, 256)
ACCELERATE_START = 512


def fixed_loop(
    model: Model, samples: Sequence[torch.Tensor], size: int, results: list[Any]
) -> None:
    """The honest fixed-size peer: ``torch.stack`` of ``size`` samples, the model, the rows."""
    for start in range(0, len(samples), size):
        results.extend(model(torch.stack(samples[start : start + size])).unbind(0))


def fixed(size: int) -> Approach:
    def run(device: SimulatedDevice, samples: list[torch.Tensor]) -> tuple[list[Any], str | None]:
        results: list[Any] = []
        try:
            fixed_loop(device.model, samples, size, results)
        except SimulatedOOM:
            return results, f"OOM at {size}"
        return results, None

    return run


def dynamic(**options: Any) -> Approach:
    """``ds.DynamicBatchProcessor(**options).map`` wired to the device (no size arguments
    unless given): its clock, memory feedback, telemetry and out-of-memory type."""

    def run(device: SimulatedDevice, samples: list[torch.Tensor]) -> tuple[list[Any], str | None]:
        with ds.DynamicBatchProcessor(
            oom_errors=(SimulatedOOM,),
            telemetry=device.telemetry,
            clock=device.clock,
            memory_monitor=device,
            **options,
        ) as processor:
            try:
                results = processor.map(device.model, samples)
            except ds.DynbatchError as error:  # a single sample that does not fit
                return [], str(error)
            assert processor.stats().ooms == device.ooms
        return results, None

    return run


def accelerate_restart(starting_batch_size: int = ACCELERATE_START) -> Approach:
    """Models ``accelerate.utils.find_executable_batch_size`` as its documentation uses it.

    The decorator calls the wrapped function (here: a whole inference pass at ``batch_size``)
    and, when that raises an out-of-memory error, halves ``batch_size`` (``//= 2``) and calls
    the function again from the start; it raises once the size reaches 0. The size found is
    kept only for that call. Work done before the error is thrown away with the function's
    locals, so an OOM mid-pass recomputes every sample before it.
    """

    def run(device: SimulatedDevice, samples: list[torch.Tensor]) -> tuple[list[Any], str | None]:
        batch_size = starting_batch_size
        while True:
            if batch_size == 0:
                return [], "no executable batch size found, reached zero"
            results: list[Any] = []
            try:
                fixed_loop(device.model, samples, batch_size, results)
            except SimulatedOOM:
                batch_size //= 2
                continue
            return results, None

    return run


def accelerate_resume(starting_batch_size: int = ACCELERATE_START) -> Approach:
    """Retry-on-OOM written into the loop (what the Accelerate pattern becomes when the caller
    keeps its progress): start at ``starting_batch_size``; when a batch runs out of memory,
    halve the size, retry the same samples, and keep the smaller size from then on. Never
    grows back."""

    def run(device: SimulatedDevice, samples: list[torch.Tensor]) -> tuple[list[Any], str | None]:
        size, start, results = starting_batch_size, 0, []
        while start < len(samples):
            chunk = samples[start : start + size]
            try:
                output = device.model(torch.stack(chunk))
            except SimulatedOOM:
                if size == 1:
                    return results, "a single sample does not fit"
                size //= 2
                continue
            results.extend(output.unbind(0))
            start += len(chunk)
        return results, None

    return run


def lightning_power(init_val: int = 2, steps_per_trial: int = 3, max_trials: int = 25) -> Approach:
    """Models Lightning's ``BatchSizeFinder`` / ``Tuner.scale_batch_size(mode="power")`` with
    its defaults, followed by the real pass.

    Search: each trial runs ``steps_per_trial`` batches of the current size from the start of
    the data (outputs discarded); on success the size doubles, unless it already covers the
    whole dataset (then the search stops); on an out-of-memory error the size halves and the
    search stops if any trial had succeeded. ``max_trials`` bounds the trials. Then the real
    pass runs at the size found with no recovery: an OOM there ends it.
    """

    def run(device: SimulatedDevice, samples: list[torch.Tensor]) -> tuple[list[Any], str | None]:
        count, size, any_success = len(samples), init_val, False
        device.phase = "trial"
        for _ in range(max_trials):
            try:
                for step in range(steps_per_trial):
                    chunk = samples[step * size : (step + 1) * size]
                    if not chunk:
                        break
                    device.model(torch.stack(chunk))
            except SimulatedOOM:
                if size < count:  # _adjust_batch_size leaves a size >= the dataset as it is
                    size = max(1, size // 2)
                if any_success:
                    break
                continue
            if size >= count:
                break
            size *= 2
            any_success = True
        device.phase = "run"
        return fixed(size)(device, samples)

    return run


def check_outputs(results: list[Any]) -> None:
    """Every delivered output is its own sample's, in input order, each exactly once."""
    got = [int(r) for r in results]
    assert got == [10 * i for i in range(len(got))], "outputs out of order, repeated or wrong"


def score(
    device: SimulatedDevice, results: list[Any], count: int, error: str | None
) -> dict[str, Any]:
    """The figures report.py prints for one pass (simulated time; wall time is irrelevant)."""
    check_outputs(results)
    seconds = device.now_ns / 1e9
    run_calls = [c for c in device.calls if c.ok and c.phase == "run"]
    steady_size = t_steady = None
    if error is None and run_calls:
        body = run_calls[:-1] if len(run_calls) > 1 else run_calls  # the last may be partial
        steady_size = int(statistics.median(c.size for c in body[-max(1, len(body) // 4) :]))
        first = len(body)
        while first > 0 and body[first - 1].size >= 0.9 * steady_size:
            first -= 1
        since = device.drop_ns if device.drop_ns is not None else 0
        t_steady = max(0, body[min(first, len(body) - 1)].start_ns - since) / 1e9
    sizes = [c.size for c in run_calls]
    return {
        "kind": "simulated",
        "samples": count,
        "samples_per_s": len(results) / seconds if error is None and seconds > 0 else 0.0,
        "sim_seconds": seconds,
        "ooms": device.ooms,
        "lost": count - len(results),
        "redone": device.executions - len(results),
        "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
        "steady_size": steady_size,
        "t_steady_s": t_steady,
        "drop_s": None if device.drop_ns is None else device.drop_ns / 1e9,
        "trial_batches": sum(c.phase == "trial" for c in device.calls),
        "error": error,
    }
