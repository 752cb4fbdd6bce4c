"""The ``dynbatch`` logger, and a throttle for events that can come once per request.

Sizing decisions go out at DEBUG, out-of-memory recoveries, isolated model errors and shed
requests at WARNING. Nothing is logged per request: shed requests (a full queue, timeouts) are
counted and reported at most once per interval. A ``NullHandler`` keeps a library from printing
unless the application configures logging (``logging.basicConfig(level=logging.INFO)``).
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["Throttled", "logger"]

logger = logging.getLogger("dynbatch")
logger.addHandler(logging.NullHandler())


class Throttled:
    """Counts an event and logs it at WARNING at most once per ``interval_s``, with the count
    since the last line: ``"<what>: 1234 in the last 1.0 s"``. Thread-safe."""

    def __init__(self, what: str, interval_s: float = 1.0) -> None:
        self._what = what
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._count = 0
        self._since = time.monotonic() - interval_s  # the first event is logged at once

    def add(self, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self._count += count
            if now - self._since < self._interval_s:
                return
            count, self._count = self._count, 0
            window, self._since = now - self._since, now
        if logger.isEnabledFor(logging.WARNING):
            logger.warning("%s: %d in the last %.1f s", self._what, count, window)
