"""A batch held back for a request's deadline is released early enough for the measured time
from release to dispatch, not a fixed millisecond: on a loaded machine a request about to be
served is served, not expired. The load here: another Python thread holding the GIL, which the
worker needs back after waiting in the core (each time, one switch interval: 20 ms)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

import dynbatch as ds

from .serving_models import tag


@pytest.fixture
def busy_interpreter() -> Iterator[None]:
    """A thread that keeps the GIL until the interpreter makes it switch (every 20 ms)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.02)
    spinner = threading.Thread(target=spin, name="gil-hog", daemon=True)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)


def test_a_request_with_a_deadline_is_served_when_the_worker_is_slow_to_claim(
    busy_interpreter: None,
) -> None:
    served: list[bool] = []
    # Batches of 8 that never fill: each request leaves by its deadline (max_delay is long).
    with ds.DynamicBatchProcessor(
        model=lambda b: b[:, 0], min_batch_size=8, max_batch_size=8, max_delay_ms=10_000.0
    ) as bp:
        for i in range(13):
            future = bp.submit(tag(i), timeout=0.3)
            try:
                served.append(float(future.result(10)) == float(i))
            except ds.RequestTimeout:
                served.append(False)
    # The first ones teach the former the delay (with 1 ms of slack they expire); after five
    # the release allows for it. Released 1 ms early, nearly all would expire (1 of 8 served
    # in a check of ours); on a machine this loaded a delay past 1.5x the longest of the last
    # 16 is rare, but not never.
    later = served[5:]
    assert sum(later) >= len(later) - 2, served
