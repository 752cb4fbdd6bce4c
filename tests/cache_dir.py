"""Sizing profiles of a test or benchmark session go to a temporary folder, never to the
user's cache."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def profiles_in(folder: Path) -> Iterator[None]:
    """``DYNBATCH_CACHE_DIR`` is ``folder`` inside (subprocesses inherit it); restored after."""
    before = os.environ.get("DYNBATCH_CACHE_DIR")
    os.environ["DYNBATCH_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ["DYNBATCH_CACHE_DIR"]
        else:
            os.environ["DYNBATCH_CACHE_DIR"] = before
