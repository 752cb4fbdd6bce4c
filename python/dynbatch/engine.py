"""The engine under the three consumers (the iterator, the server, the trainer).

One engine per processor holds what they share: the sizing policy and its telemetry, the
staging pool, the stats recorder, the per-batch memory monitor and clock, the sample schema
and core formers built from it, and out-of-memory handling. Consumers drive it; they never
reach into each other or into the facade.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _core
from .devices import default_telemetry
from .errors import ProcessorForked
from .logs import logger
from .memory import MemoryMonitor, default_memory_monitor
from .profiles import ProfileBinding, creation_site, valid_state
from .stats import Stats
from .torch_bridge import Schema
from .transfer import DeviceTarget, StagedBatch

__all__ = ["Engine", "EngineOptions"]

_GPU_UTILIZATION_TARGET = 0.8
_OOM_EVENTS_KEPT = 1024


@dataclass(frozen=True)
class EngineOptions:
    """What the facade checked and the engine uses (see ``DynamicBatchProcessor``)."""

    min_batch_size: int
    max_batch_size: int
    prefetch: int
    latency_slo_ms: float | None
    oom_errors: tuple[type[BaseException], ...]
    memory_fraction: float
    knee_tolerance: float
    pad_value: float | None  # None: stack
    pad_multiple: int
    bucket_window: int  # 0: none given (grouping per group_by_length); 1: input order
    max_tokens: int  # 0: no token budget
    # collate="pad" without a bucket_window: passes (iterator, map) group by length over
    # their whole read-ahead, as a length-sorted encode does; serving groups what is queued
    # (a request joins a batch only where its padding costs less than a batch of its own);
    # training keeps order.
    group_by_length: bool = False
    # The on-disk sizing profile: False none, a str its name, None an automatic name.
    profile: str | bool | None = False

    def pass_window(self) -> int:
        """The length-grouping window of a pass over an input (0 or 1: input order): the
        read-ahead, at least DEFAULT_GROUPING_WINDOW samples (a window of two small batches
        groups little: 72% padding efficiency against 91% over 1024, on shuffled lengths)."""
        if self.bucket_window or not self.group_by_length:
            return self.bucket_window
        return max((self.prefetch + 1) * self.max_batch_size, DEFAULT_GROUPING_WINDOW)


# Samples a pass groups by length over by default (references only: the core copies a sample
# when its batch is formed).
DEFAULT_GROUPING_WINDOW = 1024


class Engine:
    """Sizing, telemetry, staging and stats for one processor; thread-safe where the core is
    (the policy, recorder and pool serialise their own calls)."""

    def __init__(
        self,
        options: EngineOptions,
        *,
        telemetry: _core.Telemetry | None = None,
        clock: Callable[[], int] | None = None,
        memory_monitor: MemoryMonitor | None = None,
        target: DeviceTarget | None = None,
    ) -> None:
        self.options = options
        # device=: batches are copied there on the core's stream (one target, shared by the
        # consumers under a lock: stage and wait are short, and pinned slots are per engine).
        self.target = target
        self._target_lock = threading.Lock()
        cuda_index = (
            target.device.index if target is not None and target.device.type == "cuda" else None
        )
        self._owns_telemetry = telemetry is None  # a caller's telemetry may be shared
        self.telemetry = telemetry if telemetry is not None else default_telemetry(cuda_index)
        on_gpu = self.telemetry.source.startswith("nvml")
        self.policy = _core.SizingController(
            options.min_batch_size,
            options.max_batch_size,
            latency_slo_ms=options.latency_slo_ms,
            knee_tolerance=options.knee_tolerance,
            staged_memory_fraction=options.memory_fraction,
            # A GPU's utilization says whether it has compute to spare; a host's does not
            # (other processes, the loader's own threads).
            utilization_target=_GPU_UTILIZATION_TARGET if on_gpu else 0.0,
            # Padding: a batch costs its padded tokens; the controller picks a token budget.
            tokens=options.pad_value is not None,
        )
        self.oom_types: tuple[type[BaseException], ...] = (
            torch.cuda.OutOfMemoryError,
            *options.oom_errors,
        )
        self.clock: Callable[[], int] = clock if clock is not None else time.perf_counter_ns
        self.memory: MemoryMonitor = (
            memory_monitor if memory_monitor is not None else default_memory_monitor(cuda_index)
        )
        self.recorder = _core.StatsRecorder()
        # Enough slots for the batches in flight (prefetched + the caller's + one forming, and
        # with a device one more whose copy may still run); page-locked for a device.
        slots = options.prefetch + 2
        self.pool = _core.StagingPool(slots) if target is None else target.staging_pool(slots + 1)
        self.oom_seen = False  # from then on, batches are checked against the ceilings
        self._split_batches = 0
        self._oom_times_ns: deque[int] = deque(maxlen=_OOM_EVENTS_KEPT)  # core clock, for plots
        self._last_target = 0
        self._final_telemetry: dict[str, Any] | None = None
        self._closed = False
        self._worker_threads = False  # a thread of ours ran the model: its arena caches
        self._pid = os.getpid()
        self._fork_generation = _core.fork_generation()
        self.device_key = self._device_key()
        self.profile = self._profile_binding(clock is not None)
        self._sizing_restored = False  # load_state_dict: the profile is not read over it
        if self.profile is not None:
            # At exit, or when dropped without close(): what was learned since the last save.
            weakref.finalize(self, _flush_profile, self.profile, self.policy, self._fork_generation)

    # ------------------------------------------------------------------------ fork

    def forked(self) -> bool:
        """Whether this process was forked after the engine was made (its threads, core
        objects and queued work are the parent's)."""
        return self._fork_generation != _core.fork_generation()

    def check_process(self) -> None:
        """Raises ProcessorForked in a process forked after the engine was made."""
        if self._fork_generation != _core.fork_generation():
            raise self.forked_error()

    def forked_error(self) -> ProcessorForked:
        return ProcessorForked(
            f"this DynamicBatchProcessor belongs to the parent process (pid {self._pid}): it "
            "was created before fork(), and its threads, queues and device state live there. "
            "Create a new processor in this process (in a DataLoader worker: in "
            "worker_init_fn or in the dataset)"
        )

    # ------------------------------------------------------------------ the profile

    def _device_key(self) -> str:
        """Where batches run, as the profile records it: the simulated device, a CUDA device's
        name (the target's, or the one NVML reads), the telemetry's own source, or "cpu"."""
        target = self.target
        if target is not None:
            if target.device.type == "cuda":
                return f"cuda:{torch.cuda.get_device_name(target.device)}"
            return "dynbatch-sim"
        source = self.telemetry.source
        if source.startswith("nvml:"):  # "nvml:<index> <name>"
            return "cuda:" + source.partition(" ")[2]
        return "cpu" if source == "host" else source

    def _profile_binding(self, clock_injected: bool) -> ProfileBinding | None:
        setting = self.options.profile
        if setting is False or (setting is None and clock_injected):
            # An injected clock times a simulation, not this device: no automatic profile.
            return None
        name = setting if isinstance(setting, str) else None
        site = creation_site() if name is None else ""
        return ProfileBinding(name, device=self.device_key, site=site)

    def note_worker_thread(self) -> None:
        """A thread of this processor runs the model: what it frees stays cached in its own
        malloc arena, which close() hands back."""
        self._worker_threads = True

    def note_model(self, model: object) -> None:
        """The model the consumers run, for an automatic profile name."""
        if self.profile is not None:
            self.profile.note_model(model)

    def _bind_profile(self, schema: Schema) -> None:
        """On the first input: restores the profile's learned state into the sizing (unless a
        state_dict was loaded), so the first batch has the learned size."""
        profile = self.profile
        if profile is None or self.forked():
            return
        state = profile.bind(layout_of(schema), dtype_of(schema))
        if state is None or self._sizing_restored:
            return
        try:
            self.policy.import_state(state)
        except ValueError as error:  # valid JSON that this build's controller refuses
            logger.warning("sizing profile %r not used: %s", profile.name, error)
        else:
            logger.info("sizing profile %r restored (%s)", profile.name, profile.layout)

    def save_profile(self, *, force: bool = False) -> None:
        """Writes the learned state to the profile once the sizing has settled (never an
        exploration half done); ``force``: even within the interval since the last write."""
        profile = self.profile
        if profile is None or self.forked():
            return
        _save_settled(profile, self.policy, force=force)

    def pass_ended(self) -> None:
        """A pass (iterator, map, training steps) ended: its learning goes to the profile."""
        self.save_profile()

    def sizing_state(self) -> dict[str, Any]:
        """What the sizing learned, for ``state_dict()``."""
        return {"device": self.device_key, "learned": self.policy.export_state()}

    def restore_sizing(self, state: Any) -> None:
        """Restores ``sizing_state()``'s output; one learned on another device is ignored
        with a warning. Raises ValueError for anything else."""
        try:  # tuples as lists, as a checkpoint saved as JSON gives them back
            learned = json.loads(json.dumps(state["learned"]))
        except (TypeError, KeyError, ValueError):
            learned = None
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("device"), str)
            or not valid_state(learned)
        ):
            raise ValueError(
                "load_state_dict: state['sizing'] must be what state_dict() made "
                "({'device': str, 'learned': the sizing's learned state})"
            )
        if state["device"] != self.device_key:
            warnings.warn(
                f"load_state_dict: the sizing was learned on {state['device']!r}, not "
                f"{self.device_key!r}; it learns afresh here",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        try:
            self.policy.import_state(learned)
        except ValueError as error:
            raise ValueError(f"load_state_dict: state['sizing'] is not usable: {error}") from None
        self._sizing_restored = True

    # ------------------------------------------------------------------ forming batches

    def schema_for(self, first: Any) -> Schema:
        """The checks every later sample must pass, from the first one (and, on the first
        input, the profile's learned sizing)."""
        self.check_process()
        schema = Schema(
            first,
            0,
            pad_value=self.options.pad_value,
            pad_multiple=self.options.pad_multiple,
            max_tokens=self.options.max_tokens,
        )
        self._bind_profile(schema)
        return schema

    def former_for(
        self, schema: Schema, capacity: int, *, bucket_window: int | None = None, **options: Any
    ) -> _core.BatchFormer:
        """A core former for ``schema``'s samples with this engine's sizing and padding;
        ``bucket_window`` defaults to the one given; ``options`` (serving: max_delay_ms,
        aging_ms; collate=False when the caller stacks) go to the core as they are."""
        return _core.BatchFormer(
            schema.core_descriptors(),
            capacity,
            self.options.prefetch,
            self.pool,
            self.policy,
            self.telemetry,
            self.recorder,
            pad_to_multiple_of=self.options.pad_multiple,
            max_tokens=self.options.max_tokens,
            bucket_window=self.options.bucket_window if bucket_window is None else bucket_window,
            **options,
        )

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit."""
        return isinstance(error, self.oom_types)

    def fitting_size(self, bucket: int, sample_bytes: int) -> int:
        """The largest batch the sizing allows now (the OOM and memory ceilings; below
        min_batch_size if need be)."""
        reading = self.telemetry.latest()
        # Asking for a size with the current reading refreshes the ceilings (changes nothing).
        self.policy.next_batch_size(
            0,
            sample_bytes,
            reading["memory_available_bytes"],
            reading["memory_total_bytes"],
            reading["utilization"],
            bucket,
        )
        state = self.policy.state()
        return max(1, min(int(state["oom_ceiling"]), int(state["memory_ceiling"])))

    def after_oom(self, size: int, bucket: int, sample_bytes: int) -> int | None:
        """A batch of ``size`` ran out of memory: the policy learns it, and the size of the
        parts to retry it in comes back (halves, or smaller when the lowered ceilings say a
        half would not fit either); None when a lone sample cannot be split further."""
        self.policy.on_feedback(_core.BatchFeedback(size, out_of_memory=True, bucket=bucket))
        self._oom_times_ns.append(_core.now_ns())
        if size == 1:
            return None
        self.oom_seen = True
        self._split_batches += 1
        chunk = max(1, min(-(-size // 2), self.fitting_size(bucket, sample_bytes)))
        logger.warning(
            "batch of %d ran out of memory: retrying in parts of %d (size ceiling now %d)",
            size,
            chunk,
            int(self.policy.state()["oom_ceiling"]),
        )
        return chunk

    def batch_cost(self) -> tuple[float, float, int] | None:
        """The learned cost of a batch, ``L(n) = a + b*n`` as (a ns, b ns), and the size the
        sizing asks for now; None until it has two observations to fit."""
        state = self.policy.state()
        if int(state["observations"]) < 2 or int(state["target"]) < 1:
            return None
        return (
            max(float(state["latency_intercept_ns"]), 0.0),
            max(float(state["latency_slope_ns"]), 0.0),
            int(state["target"]),
        )

    def note_split(self) -> None:
        """A batch formed before the ceiling dropped is delivered in parts."""
        self._split_batches += 1

    def note_target(self, target: int) -> None:
        """Logs a change of the target batch size (once per batch at most, never per sample);
        saves the profile when a periodic save is due (a clock read otherwise)."""
        profile = self.profile
        if profile is not None and profile.due():
            self.save_profile(force=True)
        if target == self._last_target:
            return
        previous, self._last_target = self._last_target, target
        if logger.isEnabledFor(logging.DEBUG):
            state = self.policy.state()
            logger.debug(
                "target batch size %d -> %d (limits now: knee %d, memory %d, OOM %d, SLO %d%s)",
                previous,
                target,
                state["knee"],
                state["memory_ceiling"],
                state["oom_ceiling"],
                state["slo_ceiling"],
                ", exploring" if state["exploring"] else "",
            )

    # ------------------------------------------------------------------ the device

    def stage(self, leaves: list[Any], batch: _core.Batch | None) -> StagedBatch | None:
        """With a device: enqueues the batch's copies there (returns at once); else None."""
        if self.target is None:
            return None
        with self._target_lock:
            return self.target.stage(leaves, batch)

    def on_device(self, staged: StagedBatch) -> list[Any]:
        """The staged batch's leaves on the device, safe for the caller's current stream."""
        with self._target_lock:
            return staged.wait()

    def to_device(self, leaves: list[Any], batch: _core.Batch | None) -> list[Any]:
        """The leaves on the device (copied now, the caller's stream ordered after the copy);
        as they are without one."""
        staged = self.stage(leaves, batch)
        return leaves if staged is None else self.on_device(staged)

    # ---------------------------------------------------------------------- stats

    def stats(
        self, live_ns: int, *, serving: bool = False, isolated_errors: int = 0, queued: int = 0
    ) -> Stats:
        """A snapshot; ``live_ns`` is the active time of passes still running; ``serving``:
        the requests of a server rather than passes over an input."""
        self.check_process()
        telemetry = self._final_telemetry or self.telemetry_reading()
        return Stats.from_core(
            self.recorder.snapshot(),
            live_ns,
            self.policy.state(),
            telemetry,
            self.pool.stats(),
            self._split_batches,
            isolated_errors=isolated_errors,
            queued=queued,
            oom_times_ns=list(self._oom_times_ns),
            latency_slo_ms=self.options.latency_slo_ms,
            serving=serving,
        )

    def telemetry_reading(self) -> dict[str, Any]:
        latest = self.telemetry.latest()
        return {
            "source": self.telemetry.source,
            "peak_rss_bytes": self.telemetry.peak_rss_bytes,
            "min_available_bytes": self.telemetry.min_available_bytes,
            "available_bytes": latest["memory_available_bytes"],
            "total_bytes": latest["memory_total_bytes"],
        }

    def reset_stats(self) -> None:
        """Starts the counters and the memory peaks afresh (the learned costs are kept)."""
        self.check_process()
        self.recorder.reset()
        if not self._closed:
            self.telemetry.reset_peak()
        self._split_batches = 0
        self._oom_times_ns.clear()

    def close(self) -> None:
        """Keeps the last telemetry reading for stats() and stops the sampler. Idempotent. In
        a forked child it only lets go of the parent's sampler (the core leaks it there)."""
        if self._closed:
            return
        self._closed = True
        self.save_profile(force=True)
        if not self.forked():
            self._final_telemetry = self.telemetry_reading()
            # What the worker freed stays cached in its malloc arena. Not after a pass on the
            # caller's thread: that arena is the caller's, and trimming it cost every pass the
            # trim (~5 ms on a test process's heap) and the page faults that refilled it.
            if self._worker_threads:
                _core.release_cached_memory()
        if self._owns_telemetry:
            self.telemetry.close()
        if self.target is not None:
            with self._target_lock:
                self.target.close()


def layout_of(schema: Schema) -> str:
    """The input layout a profile is kept for: every leaf's path, dtype and shape (-1 where a
    padded leaf's length varies)."""
    leaves = ",".join(
        f"{spec.path or '.'}:{str(spec.dtype).removeprefix('torch.')}{list(spec.shape)}"
        for spec in schema.leaves
    )
    return ("pad " if schema.padded else "stack ") + leaves


def dtype_of(schema: Schema) -> str:
    """The first floating leaf's dtype ("none" without one)."""
    for spec in schema.leaves:
        if spec.dtype.is_floating_point:
            return str(spec.dtype).removeprefix("torch.")
    return "none"


def _save_settled(profile: ProfileBinding, policy: _core.SizingController, *, force: bool) -> None:
    if not policy.state()["exploring"]:
        profile.save(policy.export_state(), force=force)


def _flush_profile(
    profile: ProfileBinding, policy: _core.SizingController, generation: int
) -> None:
    """The engine's finalizer (at exit, or when it is dropped): never the engine itself."""
    if generation == _core.fork_generation():
        _save_settled(profile, policy, force=True)
