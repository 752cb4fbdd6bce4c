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
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "ProfileBinding",
    "ProfileStore",
    "creation_site",
    "default_directory",
    "model_identity",
    "valid_state",
]

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
    _warn_message_once(str(path), reason, f"dynbatch profile {path} ignored: {reason}")


def _warn_message_once(where: str, reason: str, message: str) -> None:
    if (where, reason) in _warned:
        return
    _warned.add((where, reason))
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    return value


def valid_state(state: object) -> bool:
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
            for point in points:  # [size, value] or [size, value, measurements]
                if not (isinstance(point, list) and len(point) in (2, 3)):
                    return False
                if not all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in point
                ):
                    return False
                if len(point) == 3 and not (isinstance(point[2], int) and point[2] >= 1):
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
        if not valid_state(state):
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
        if not valid_state(plain):
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
                # dumps, not dump: dump streams through json's Python encoder, whose closures
                # are a reference cycle per call (32 objects left for the GC at every save).
                file.write(json.dumps(entry))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        return path


def model_identity(model: object) -> str:
    """What a model is, stably across runs: a module's class and a digest of its parameters'
    names, shapes and dtypes (its architecture, not its weights); a function's qualified name
    and the modules its closure holds; a bound method's object and name; a partial's function."""
    return _identity(model, 0)


def _identity(obj: object, depth: int) -> str:
    if depth > 4:
        return type(obj).__qualname__
    named = getattr(obj, "named_parameters", None)
    if callable(named):  # an nn.Module (duck-typed: no torch import here)
        try:
            shapes = ";".join(
                f"{name}:{tuple(param.shape)}:{param.dtype}" for name, param in named()
            )
        except Exception:  # a stand-in with another signature: its class alone
            shapes = ""
        digest = hashlib.sha256(shapes.encode()).hexdigest()[:12]
        return f"{type(obj).__module__}.{type(obj).__qualname__}#{digest}"
    if isinstance(obj, functools.partial):
        inner = [_identity(obj.func, depth + 1)]
        inner += [_identity(arg, depth + 1) for arg in obj.args if _is_module(arg)]
        return "partial(" + ",".join(inner) + ")"
    if inspect.ismethod(obj):
        return f"{_identity(obj.__self__, depth + 1)}.{obj.__func__.__name__}"
    if inspect.isfunction(obj):
        held = [
            _identity(cell.cell_contents, depth + 1)
            for cell in obj.__closure__ or ()
            if _is_module(_cell_value(cell))
        ]
        name = f"{obj.__module__}.{obj.__qualname__}"
        return name + ("[" + ",".join(held) + "]" if held else "")
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _cell_value(cell: Any) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _is_module(obj: object) -> bool:
    return callable(getattr(obj, "named_parameters", None))


def creation_site() -> str:
    """The file and function that made the processor: the first frame outside dynbatch."""
    package = str(Path(__file__).resolve().parent)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if not code.co_filename.startswith(package):
            function = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11
            return f"{os.path.abspath(code.co_filename)}:{function}"
        frame = frame.f_back
    return "<unknown>"


class ProfileBinding:
    """One processor's profile: which entry it reads and writes, and when. Thread-safe; its
    methods never raise into the caller's loop (a failed write warns once per folder).

    ``name``: the entry's name, or None for an automatic one, decided when the first input's
    layout is known: the creation ``site`` (file and function) plus the identity of the first
    model noted before then (``note_model``). The first ``bind`` loads the entry for that
    layout, device and dtype; ``save`` writes the learned state when it changed, the first time
    at once, later at most every ``interval_s`` unless ``force``d (a processor's close).
    """

    def __init__(
        self,
        name: str | None,
        *,
        device: str,
        site: str = "",
        store: ProfileStore | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self.store = store if store is not None else ProfileStore()
        self.device = device
        self._name = name
        self._site = site
        self._model: str | None = None
        self._interval_ns = int(interval_s * 1e9)
        self._lock = threading.Lock()
        self._key: tuple[str, str, str] | None = None  # (name, layout, dtype) once bound
        self._last: dict[str, Any] | None = None  # the state on disk, as far as we know
        self._saved_ns: int | None = None
        self._next_check_ns = 0

    @property
    def name(self) -> str | None:
        """The entry's name (None while an automatic one is not decided yet)."""
        return self._key[0] if self._key is not None else self._name

    @property
    def layout(self) -> str | None:
        """The input layout it is bound to (None before the first input)."""
        return self._key[1] if self._key is not None else None

    def note_model(self, model: object) -> None:
        """The model this processor runs (for an automatic name; the first one counts)."""
        if self._name is None and self._model is None and self._key is None:
            try:
                self._model = model_identity(model)
            except Exception:  # an odd object's attributes: its type still tells something
                self._model = f"{type(model).__module__}.{type(model).__qualname__}"

    def bind(self, layout: str, dtype: str) -> dict[str, Any] | None:
        """The saved state for this input ``layout`` on the first call (None when there is
        none or it cannot be used); None on later calls."""
        with self._lock:
            if self._key is not None:
                return None
            name = self._name or self._automatic_name()
            self._key = (name, layout, dtype)
            self._next_check_ns = time.monotonic_ns() + self._interval_ns
            try:
                state = self.store.load(name, layout=layout, device=self.device, dtype=dtype)
            except Exception as error:  # e.g. a name the store refuses: learn afresh
                _warn_message_once(
                    str(self.store.directory),
                    "read",
                    f"dynbatch profile {name!r} not read from {self.store.directory}: {error}",
                )
                return None
            self._last = state
            return state

    def _automatic_name(self) -> str:
        job = f"{self._site}\0{self._model or ''}"
        stem = Path(self._site.rsplit(":", 1)[0]).stem or "job"
        return f"auto-{stem}-{hashlib.sha256(job.encode()).hexdigest()[:12]}"

    def save(self, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Writes ``state`` when it differs from the entry; True when it wrote."""
        with self._lock:
            if self._key is None:
                return False
            now = time.monotonic_ns()
            if (
                not force
                and self._saved_ns is not None
                and now - self._saved_ns < self._interval_ns
            ):
                return False
            plain = json.loads(json.dumps(dict(state)))
            if plain == self._last:
                return False
            name, layout, dtype = self._key
            self._saved_ns = now
            try:
                self.store.save(name, plain, layout=layout, device=self.device, dtype=dtype)
            except Exception as error:  # a read-only or full cache folder: warn, go on
                reason = getattr(error, "strerror", None) or str(error)
                _warn_message_once(
                    str(self.store.directory),
                    "write",
                    f"dynbatch profiles cannot be saved in {self.store.directory} ({reason}): "
                    "the next run learns its batch sizes afresh (set DYNBATCH_CACHE_DIR to a "
                    "writable folder, or profile=False)",
                )
                return False
            self._last = plain
            return True

    def due(self) -> bool:
        """True at most once per interval, once bound: time for a periodic save (otherwise
        a clock read and a comparison, cheap enough to ask once per batch)."""
        now = time.monotonic_ns()
        if self._key is None or now < self._next_check_ns:
            return False
        self._next_check_ns = now + self._interval_ns
        return True
