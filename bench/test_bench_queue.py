"""Group "queue-push-pop": push then pop 1000 ints, single thread; peer: ``queue.Queue``.

The question is the per-call cost of the core's MPMC ring seen from Python (a binding call per
item, or one per 1000 items in bulk) against the standard library's queues. No contention.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from dynbatch import _core

N = 1000
EXPECTED = list(range(N))
GROUP = "queue-push-pop"


def _request_queue() -> tuple[Any, Callable[[], list[int]], Callable[[], bool]]:
    q = _core.RequestQueue(1024)
    assert q.capacity >= N
    push, pop = q.try_push, q.try_pop

    def run() -> list[int]:
        for i in range(N):
            push(i)
        return [pop() for _ in range(N)]

    return q, run, lambda: q.try_pop() is None


def _request_queue_bulk() -> tuple[Any, Callable[[], list[int]], Callable[[], bool]]:
    q = _core.RequestQueue(1024)
    values = EXPECTED

    def run() -> list[int]:
        pushed = q.push_many(values)
        popped: list[int] = q.pop_many(N)
        assert pushed == N
        return popped

    return q, run, lambda: q.try_pop() is None


def _queue_queue() -> tuple[Any, Callable[[], list[int]], Callable[[], bool]]:
    q: queue.Queue[int] = queue.Queue(maxsize=1024)
    push, pop = q.put_nowait, q.get_nowait

    def run() -> list[int]:
        for i in range(N):
            push(i)
        return [pop() for _ in range(N)]

    return q, run, q.empty


def _simple_queue() -> tuple[Any, Callable[[], list[int]], Callable[[], bool]]:
    q: queue.SimpleQueue[int] = queue.SimpleQueue()
    push, pop = q.put_nowait, q.get_nowait

    def run() -> list[int]:
        for i in range(N):
            push(i)
        return [pop() for _ in range(N)]

    return q, run, q.empty


def _deque() -> tuple[Any, Callable[[], list[int]], Callable[[], bool]]:
    q: deque[int] = deque()
    push, pop = q.append, q.popleft

    def run() -> list[int]:
        for i in range(N):
            push(i)
        return [pop() for _ in range(N)]

    return q, run, lambda: len(q) == 0


IMPLS = {
    "queue.Queue": _queue_queue,  # the peer
    "queue.SimpleQueue": _simple_queue,
    "collections.deque": _deque,
    "RequestQueue": _request_queue,
    "RequestQueue-bulk": _request_queue_bulk,
}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_queue_push_pop(impl: str, benchmark: Any, measure: Callable[..., Any]) -> None:
    benchmark.group = GROUP
    _, run, is_empty = IMPLS[impl]()
    # One checked round before timing (also warms the code path), then the timed rounds.
    assert run() == EXPECTED
    popped = measure(run)
    assert popped == EXPECTED, f"{impl} popped the wrong values"
    assert is_empty(), f"{impl} is not empty after popping everything"
