"""Nothing left behind: a serving processor dropped without close() is freed (its threads end,
its server is collected, its queued requests still run), and create/use/close cycles keep
memory flat (growth judged by what is live: memory_probe)."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import dynbatch as ds
from dynbatch import _core
from dynbatch.serving import Server

from .conftest import os_thread_count
from .memory_probe import Live, live, resident_bytes
from .serving_models import RecordingModel, tag

HANG_S = 60.0  # only a hang (a thread that never ends) reaches it


def settle(predicate: object, limit_s: float = HANG_S) -> bool:
    """Collects garbage until `predicate()` holds (threads end asynchronously)."""
    deadline = time.monotonic() + limit_s
    while True:
        gc.collect()
        if predicate():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def servers_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Server)  # no __class__ lookups


def test_dropped_serving_processors_are_freed() -> None:
    # Process-wide threads start with the first processor (the device's shared scheduler
    # samples memory, torch starts its thread pool): one closed processor first.
    with ds.DynamicBatchProcessor(model=lambda b: b * 2, max_delay_ms=0.0) as warm:
        warm.submit(tag(0)).result(HANG_S)
    del warm
    assert settle(lambda: servers_alive() == 0)
    baseline = os_thread_count()
    for i in range(50):
        bp = ds.DynamicBatchProcessor(model=lambda b: b * 2, max_delay_ms=0.0)
        assert bp.submit(tag(i)).result(HANG_S)[0].item() == 2.0 * i
        del bp  # no close()
    assert settle(lambda: os_thread_count() <= baseline), (
        f"{os_thread_count() - baseline} threads left behind"
    )
    assert servers_alive() == 0


def test_a_dropped_processor_still_runs_what_was_queued() -> None:
    model = RecordingModel(delay_s=0.002)
    bp = ds.DynamicBatchProcessor(model=model, max_batch_size=4, max_delay_ms=1.0)
    futures = bp.submit_many([tag(i) for i in range(40)])
    del bp
    assert [f.result(HANG_S).item() for f in futures] == [10.0 * i for i in range(40)]
    assert settle(lambda: servers_alive() == 0)


def test_dropping_a_processor_from_a_done_callback_does_not_block_the_worker() -> None:
    holder: dict[str, ds.DynamicBatchProcessor] = {}
    done = threading.Event()

    def drop(_: object) -> None:
        holder.clear()  # the last reference goes on the worker thread
        done.set()

    holder["bp"] = ds.DynamicBatchProcessor(model=lambda b: b, max_delay_ms=0.0)
    holder["bp"].submit(tag(1)).add_done_callback(drop)
    assert done.wait(HANG_S)
    assert settle(lambda: servers_alive() == 0)


# ----------------------------------------------------------------------- memory


def test_close_trims_malloc_only_after_a_worker_thread_ran_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass on the caller's thread leaves the caller's malloc arena alone (trimming it cost
    every pass the trim and the page faults that refill it); a server's worker thread has an
    arena of its own, which close() hands back."""
    trims: list[int] = []
    monkeypatch.setattr(_core, "release_cached_memory", lambda: trims.append(1))
    samples = [torch.full((3,), float(i)) for i in range(20)]
    with ds.DynamicBatchProcessor(profile=False) as processor:
        assert sum(len(batch) for batch in processor(samples)) == 20
        assert len(processor.map(lambda batch: batch * 2, samples)) == 20
    assert trims == []
    with ds.DynamicBatchProcessor(model=lambda batch: batch * 2, profile=False) as processor:
        assert torch.equal(processor.submit(samples[3]).result(HANG_S), samples[3] * 2)
    assert trims == [1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_create_use_close_cycles_keep_memory_flat() -> None:
    """Ten windows of 20 cycles with 16 MiB batches, the size that made glibc cache freed
    batches in the arenas of each processor's threads (200 cycles grew the resident size by
    ~110 MiB with the memory in use flat). What is live must not grow from the first windows
    to the last (a leak), and the resident size read after close() (which returns what the
    arenas cache; the test itself does not trim) stays within a band of the early windows."""
    samples = [torch.randn(16384) for _ in range(256)]

    def cycle() -> None:
        bp = ds.DynamicBatchProcessor(model=lambda b: b * 2, max_batch_size=1024)
        for future in bp.submit_many(samples):
            future.result(HANG_S)
        bp.close()

    measured: list[Live] = []
    resident: list[int] = []
    for _ in range(10):
        for _ in range(20):
            cycle()
        settle(lambda: servers_alive() == 0)
        measured.append(live())
        resident.append(resident_bytes(trim=False))
    trace = ", ".join(f"{r / 2**20:.0f}" for r in resident)
    early, late = measured[1:5], measured[5:]
    grown_blocks = max(m.python_blocks for m in late) - max(m.python_blocks for m in early)
    assert grown_blocks < 2000, f"{grown_blocks} more Python objects live"
    if measured[0].native_bytes >= 0:
        grown = max(m.native_bytes for m in late) - max(m.native_bytes for m in early)
        assert grown < 4 * 2**20, f"{grown / 2**20:.1f} MiB more in use"
    grown_resident = max(resident[5:]) - max(resident[1:5])
    assert grown_resident < 48 * 2**20, f"resident grew {grown_resident / 2**20:.0f} MiB: {trace}"
