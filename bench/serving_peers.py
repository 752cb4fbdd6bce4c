"""What users would otherwise use to serve concurrent requests in batches, set up the same way
as dynbatch in the serving benchmarks: same model, same largest batch, same longest wait.

- ``PlainBatcher``: the textbook batcher, ``queue.Queue`` + one worker thread +
  ``concurrent.futures.Future`` per request; the worker takes what is queued up to the largest
  batch, waiting at most ``max_delay_ms`` for more, stacks, runs the model, sets each result.
- ``batched`` (PyPI, mixedbread-ai): its ``BatchProcessor`` (threads) and
  ``aio.BatchProcessor`` (asyncio) around a function from a list of samples to a list of
  results. Its thread API blocks per call; to submit without waiting, as ``submit`` does, the
  benchmarks call ``BatchProcessor._schedule`` (what its ``__call__`` runs before it waits).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

Model = Callable[[torch.Tensor], torch.Tensor]


class PlainBatcher:
    """queue.Queue + worker thread + concurrent.futures."""

    _STOP = object()

    def __init__(self, model: Model, max_batch_size: int, max_delay_ms: float) -> None:
        self._model = model
        self._max = max_batch_size
        self._delay_s = max_delay_ms / 1e3
        self._queue: queue.Queue[Any] = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    def submit(self, sample: torch.Tensor) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((sample, future))
        return future

    def submit_many(self, samples: Sequence[torch.Tensor]) -> list[Future[Any]]:
        return [self.submit(sample) for sample in samples]

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is self._STOP:
                return
            batch = [item]
            deadline = time.monotonic() + self._delay_s
            while len(batch) < self._max:
                remaining = deadline - time.monotonic()
                try:
                    item = get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is self._STOP:
                    self._queue.put(item)
                    break
                batch.append(item)
            rows = self._model(torch.stack([sample for sample, _ in batch])).unbind(0)
            for (_, future), row in zip(batch, rows, strict=True):
                future.set_result(row)

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._worker.join()


def batched_function(model: Model) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The list-to-list function ``batched`` wraps, doing what the plain batcher does."""

    def run(samples: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(model(torch.stack(samples)).unbind(0))

    return run


def batched_available() -> bool:
    try:
        import batched  # noqa: F401
    except ImportError:
        return False
    return True
