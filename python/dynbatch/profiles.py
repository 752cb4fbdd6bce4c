"""ProfileStore: what the sizing learned in past runs, kept on disk per input layout and device.

A profile is a sizing controller's learned state (``SizingController.export_state()``: the
latency and memory lines' points per input shape, the out-of-memory ceiling), saved under a
name for one input layout, device and dtype. A later run of the same job restores it
(``import_state``) and starts at the learned size, only verifying it.

Where: ``$DYNBATCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dynbatch`` (``~/.cache/dynbatch``),
in ``profiles/``. One JSON file per (name, layout): writes go to a temporary file in the same
folder and replace the entry with ``os.replace``, so a reader sees the old entry or the new one,
never a mix, and two processes writing at once lose nothing but one of their own last writes.
An entry that cannot be used (unreadable or corrupt, written by another format version, or
learned on another device or dtype) is ignored with one warning per entry and reason, never an
exception: the run then learns afresh and its save replaces the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_VERSION", "ProfileStore", "default_directory"]

FORMAT_VERSION = 1
_warned: set[tuple[str, str]] = set()


def default_directory() -> Path:
    """``$DYNBATCH_CACHE_DIR/profiles``, else the user's cache folder's ``dynbatch/profiles``."""
    configured = os.environ.get("DYNBATCH_CACHE_DIR")
    if configured:
        return Path(configured).expanduser() / "profiles"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "dynbatch" / "profiles"


def _warn_once(path: Path, reason: str) -> None:
    if (str(path), reason) in _warned:
        return
    _warned.add((str(path), reason))
    warnings.warn(f"dynbatch profile {path} ignored: {reason}", RuntimeWarning, stacklevel=3)


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _valid_state(state: object) -> bool:
    """The shape ``export_state()`` gives: buckets of finite positive points, int ceilings."""
    if not isinstance(state, dict) or not isinstance(state.get("buckets"), list):
        return False
    for key in ("oom_ceiling", "failed_size", "longest"):
        if not isinstance(state.get(key), int) or state[key] < 0:
            return False
    for bucket in state["buckets"]:
        if not isinstance(bucket, dict) or not isinstance(bucket.get("key"), int):
            return False
        for line in ("latency", "memory"):
            points = bucket.get(line)
            if not isinstance(points, list):
                return False
            for point in points:
                if not (isinstance(point, list) and len(point) == 2):
                    return False
                if not all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in point
                ):
                    return False
    return True


class ProfileStore:
    """Learned sizing state on disk, per name, input layout, device and dtype.

    ``layout`` identifies the input (e.g. a schema's leaf shapes and dtypes), ``device`` where
    it ran (e.g. ``"cpu"`` or ``"cuda:NVIDIA H100 80GB HBM3"``), ``dtype`` the model's
    compute dtype (e.g. ``"float32"``). ``save`` and ``load`` never raise for a bad entry on
    disk; they raise ``TypeError`` for bad arguments.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()

    def path(self, name: str, layout: str) -> Path:
        """The file that holds ``name``'s entry for ``layout``."""
        _check_text("name", name)
        _check_text("layout", layout)
        digest = hashlib.sha256(f"{name}\0{layout}".encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
        return self.directory / f"{safe}-{digest}.json"

    def load(self, name: str, *, layout: str, device: str, dtype: str) -> dict[str, Any] | None:
        """The learned state saved for this name, layout, device and dtype; None when there is
        none or the entry cannot be used (one warning per entry and reason)."""
        _check_text("device", device)
        _check_text("dtype", dtype)
        path = self.path(name, layout)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as error:
            _warn_once(path, f"unreadable ({error.strerror or error})")
            return None
        try:
            entry = json.loads(text)
        except ValueError:
            _warn_once(path, "corrupt (not JSON)")
            return None
        if not isinstance(entry, dict):
            _warn_once(path, "corrupt (not a profile)")
            return None
        if entry.get("version") != FORMAT_VERSION:
            _warn_once(path, f"format version {entry.get('version')!r}, not {FORMAT_VERSION}")
            return None
        if entry.get("layout") != layout or entry.get("name") != name:
            _warn_once(path, "written for another name or input layout")
            return None
        for key, wanted in (("device", device), ("dtype", dtype)):
            if entry.get(key) != wanted:
                _warn_once(path, f"learned on {key} {entry.get(key)!r}, not {wanted!r}")
                return None
        state = entry.get("state")
        if not _valid_state(state):
            _warn_once(path, "corrupt (bad learned state)")
            return None
        assert isinstance(state, dict)
        return state

    def save(
        self, name: str, state: Mapping[str, Any], *, layout: str, device: str, dtype: str
    ) -> Path:
        """Writes the entry atomically (a temporary file, then ``os.replace``); returns its
        path."""
        _check_text("device", device)
        _check_text("dtype", dtype)
        plain = json.loads(json.dumps(dict(state)))  # tuples -> lists, as load() returns them
        if not _valid_state(plain):
            raise TypeError("state must be what SizingController.export_state() returns")
        path = self.path(name, layout)
        entry = {
            "version": FORMAT_VERSION,
            "name": name,
            "layout": layout,
            "device": device,
            "dtype": dtype,
            "state": plain,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent
        )
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(entry, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return path
