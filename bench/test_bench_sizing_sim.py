"""Groups "sizing-sim-<scenario>": batch sizing on a simulated device (fake clock, CPU).

Throughput is samples / simulated seconds of one whole pass from a cold start (every
exploration, trial, failed attempt and recomputation counted), so it is deterministic;
pytest-benchmark only times the wall clock of the simulation. The figures go to
``benchmark.extra_info``; ``python bench/report.py`` prints them as ratios to the best fixed
size and to fixed 32. Nothing here asserts a timing or a ratio.

Scenarios (latency a + b*n, memory m0 + m1*n):
- ``memory``: a = 50 ms, b = 0.1 ms, m0 = 1 GiB, m1 = 20 MiB, 10 GiB: the largest batch that
  fits is 460, beyond every fixed size of the sweep;
- ``knee``: a = 5 ms, b = 50 us, m0 = 256 MiB, m1 = 1 MiB, 80 GiB: no memory pressure; the
  throughput knee (n / L(n) within 5% of 1/b) is at 1900;
- ``drop4g`` / ``drop5g``: ``memory``, and another process takes 4 / 5 GiB when the pass
  first reaches 30% of the samples (the largest fitting batch falls to 256 / 204).

Entries: ``dynamic`` (``DynamicBatchProcessor()`` with no size arguments; in ``knee`` also
``dynamic-max4096``), the oracle sweep ``fixed-<k>`` (a plain ``torch.stack`` loop, which
fails at its first OOM: throughput 0, the rest of the samples lost), and the peers modelled in
``sizing.py``: ``accelerate-restart`` (``find_executable_batch_size`` from 512),
``accelerate-resume`` (halve and retry the same batch) and ``lightning-power`` (Lightning's
power-scaling search, defaults, then the pass at the size found).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

import pytest
from simulated import GIB, MIB, DeviceSpec, SimulatedDevice, tagged_samples
from sizing import (
    FIXED_SIZES,
    Approach,
    accelerate_restart,
    accelerate_resume,
    dynamic,
    fixed,
    lightning_power,
    score,
)

MEMORY = DeviceSpec(a_s=0.05, b_s=1e-4, m0=GIB, m1=20 * MIB, capacity=10 * GIB)
SCENARIOS = {
    "memory": MEMORY,
    "knee": DeviceSpec(a_s=0.005, b_s=5e-5, m0=256 * MIB, m1=MIB, capacity=80 * GIB),
    "drop4g": replace(MEMORY, drop_bytes=4 * GIB),
    "drop5g": replace(MEMORY, drop_bytes=5 * GIB),
}

APPROACHES: dict[str, Approach] = {
    "dynamic": dynamic(),
    **{f"fixed-{size}": fixed(size) for size in FIXED_SIZES},
    "accelerate-restart": accelerate_restart(),
    "accelerate-resume": accelerate_resume(),
    "lightning-power": lightning_power(),
}
EXTRA = {"knee": {"dynamic-max4096": dynamic(max_batch_size=4096)}}

CASES = [
    (scenario, impl) for scenario in SCENARIOS for impl in [*APPROACHES, *EXTRA.get(scenario, {})]
]

_samples_cache: dict[int, list[Any]] = {}


def _samples(count: int) -> list[Any]:
    if count not in _samples_cache:
        _samples_cache.clear()
        _samples_cache[count] = tagged_samples(count)
    return _samples_cache[count]


@pytest.mark.parametrize(("scenario", "impl"), CASES)
def test_sizing_sim(scenario: str, impl: str, bench_size: Any, benchmark: Any) -> None:
    spec = SCENARIOS[scenario]
    approach = {**APPROACHES, **EXTRA.get(scenario, {})}[impl]
    count = bench_size.sizing_sim_samples
    samples = _samples(count)
    benchmark.group = f"sizing-sim-{scenario}"
    scores: list[dict[str, Any]] = []

    def run() -> None:
        device = SimulatedDevice(spec, count)
        results, error = approach(device, samples)
        figures = score(device, results, count, error)  # checks every output delivered
        figures["best_size_start"] = (spec.capacity - spec.m0) // spec.m1
        figures["best_size_end"] = device.best_size()
        scores.append(figures)

    rounds = 1 if bench_size.name == "tiny" else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1)

    throughputs = [figures["samples_per_s"] for figures in scores]
    extra = dict(scores[-1], bench_size=bench_size.name)
    extra["samples_per_s"] = statistics.median(throughputs)
    extra["samples_per_s_min"], extra["samples_per_s_max"] = min(throughputs), max(throughputs)
    benchmark.extra_info.update(extra)
    if impl.startswith("dynamic"):
        # The contract, not a timing: no sample lost or run twice, whatever the scenario.
        assert extra["error"] is None, extra["error"]
        assert extra["lost"] == 0 and extra["redone"] == 0, extra
