"""The ``dynbatch`` logger, and a throttle for events that can come once per request.

Sizing decisions go out at DEBUG, out-of-memory recoveries, isolated model errors and shed
requests at WARNING. Nothing is logged per request: events that can come once per request
(a full queue, timeouts, requests failing alone) are counted and reported at most once per
interval. A ``NullHandler`` keeps a library from printing unless the application configures
logging (``logging.basicConfig(level=logging.INFO)``).
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["Throttled", "logger"]

logger = logging.getLogger("dynbatch")
logger.addHandler(logging.NullHandler())


class Throttled:
    """Counts an event and logs it at WARNING at most once per ``interval_s``: the first event
    at once (``"<what>: 1 (latest: <detail>)"``), then ``"<what>: N in the last 1.0 s"``. A
    count still pending when the events stop is logged by a timer one interval later, so
    nothing counted goes unreported. Thread-safe."""

    def __init__(self, what: str, interval_s: float = 1.0) -> None:
        self._what = what
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._count = 0
        self._detail = ""
        self._since: float | None = None  # when the last line went out
        self._flush: threading.Timer | None = None

    def add(self, count: int = 1, detail: str = "") -> None:
        if count <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._count += count
            self._detail = detail or self._detail
            if self._since is not None and now - self._since < self._interval_s:
                if self._flush is None:  # report the rest even if no event comes after
                    self._flush = threading.Timer(self._interval_s, self._emit)
                    self._flush.daemon = True
                    self._flush.start()
                return
        self._emit()

    def _emit(self) -> None:
        now = time.monotonic()
        with self._lock:
            count, self._count = self._count, 0
            detail, self._detail = self._detail, ""
            since, self._since = self._since, now
            self._flush = None
        if count == 0 or not logger.isEnabledFor(logging.WARNING):
            return
        window = "" if since is None else f" in the last {now - since:.1f} s"
        latest = f" (latest: {detail})" if detail else ""
        logger.warning("%s: %d%s%s", self._what, count, window, latest)
