"""Type stubs of dynbatch._core, the compiled core (private: use the dynbatch package)."""

from collections.abc import Sequence
from os import PathLike
from typing import Any, ClassVar

from typing_extensions import CapsuleType

# (sample shape, DLPack code, bits, lanes); a padded leaf: shape (-1, ...) plus one pad element
LeafDescriptor = tuple[list[int], int, int, int] | tuple[list[int], int, int, int, bytes]

__version__: str

class ForkedError(RuntimeError):
    """A core object used in a process forked after it was made (it belongs to the parent)."""

def attributes_are(objects: Sequence[Any], name: str, value: object) -> bool:
    """Whether getattr(o, name) is value for every o in objects."""

def fork_generation() -> int:
    """0 in the process that loaded the core; one more in each forked child."""

def release_cached_memory() -> None:
    """Returns the free memory malloc keeps cached in its arenas to the OS (glibc)."""

def build_info() -> dict[str, Any]: ...
def host_telemetry() -> dict[str, Any]: ...
def nvml_status(library: str | PathLike[str] | None = None) -> dict[str, Any]:
    """available, reason, device_count, library; None: the process-wide default library."""

def nvml_index_of_pci_bus_id(pci_bus_id: str, library: str | PathLike[str] | None = None) -> int:
    """NVML's index of the device at this PCI bus id; -1 when unknown."""

def nvml_devices(library: str | PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One reading per device NVML sees (empty when NVML is unavailable)."""

class RequestQueue:
    def __init__(self, capacity: int, start_position: int = 0) -> None: ...
    def try_push(self, value: int) -> bool: ...
    def try_pop(self) -> int | None: ...
    def push_many(self, values: list[int]) -> int: ...
    def pop_many(self, max_items: int, timeout_s: float | None = 0.0) -> list[int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def capacity(self) -> int: ...
    def was_size(self) -> int: ...

class Telemetry:
    @staticmethod
    def host(period_s: float = 0.05) -> Telemetry: ...
    @staticmethod
    def auto(device_index: int = -1, period_s: float = 0.05) -> Telemetry:
        """NVML for device_index when it can be read there, else the host (device_index < 0)."""
    @staticmethod
    def nvml(
        device_index: int, period_s: float = 0.05, library: str | PathLike[str] | None = None
    ) -> Telemetry:
        """Raises RuntimeError, saying why, when NVML cannot read device_index."""
    @staticmethod
    def scripted(
        memory_total_bytes: int,
        memory_available_bytes: int,
        process_rss_bytes: int = 0,
        utilization: float = 0.0,
        period_s: float = 0.05,
    ) -> Telemetry: ...
    def set_scripted(
        self,
        memory_total_bytes: int,
        memory_available_bytes: int,
        process_rss_bytes: int = 0,
        utilization: float = 0.0,
    ) -> None: ...
    def latest(self) -> dict[str, Any]: ...
    @property
    def source(self) -> str: ...
    @property
    def peak_rss_bytes(self) -> int: ...
    @property
    def min_available_bytes(self) -> int: ...
    def reset_peak(self) -> None: ...
    def close(self) -> None: ...

class StagingPool:
    def __init__(self, slots: int, device: Device | None = None) -> None:
        """device: slots come from its page-locked allocator (pageable when pinning fails)."""
    def stats(self) -> dict[str, Any]:
        """Counters; pinned_bytes, pinned_fallbacks and pinned_error (a warning, not an error)."""

class DeviceError(RuntimeError):
    """A device call failed (it names the call and the device), or the device was lost."""

class Device:
    @property
    def name(self) -> str: ...
    def gather(
        self,
        stream: int,
        sources: list[int],
        destination: int,
        row_bytes: int,
        rows: int = 1,
        lengths: list[int] = ...,
        pad: bytes = b"",
    ) -> None:
        """One launch on ``stream``: stack (or pad to ``rows`` rows) samples already on the
        device into ``destination``; ``pad`` is one pad element."""

def cuda_device(index: int) -> Device:
    """The CUDA backend for device ``index``; DeviceError when there is none."""

class Gate:
    def open(self) -> None: ...

class SimulatedDevice(Device):
    def __init__(
        self,
        min_delay_us: float = 0.0,
        max_delay_us: float = 0.0,
        seed: int = 0,
        real_time: bool = True,
        pinned_limit_bytes: int | None = None,
        wait_log_capacity: int = 4096,
    ) -> None: ...
    def host_work(self, ns: int) -> None: ...
    def host_time_ns(self) -> int: ...
    def event_time_ns(self, event: int) -> int: ...
    def enqueue_delay(self, stream: int, ns: int) -> None: ...
    def hold(self, stream: int) -> Gate:
        """Work on ``stream`` after this point waits until the gate opens."""
    def fail(self, reason: str) -> None: ...
    def first_error(self) -> str: ...
    def errors(self) -> list[str]: ...
    def waits(self) -> list[tuple[int, int, int]]:
        """(stream, event, generation) of the latest stream waits, oldest first."""
    def stats(self) -> dict[str, int]: ...

class Stream:
    def __init__(self, device: Device) -> None: ...
    @property
    def handle(self) -> int: ...

class Event:
    def __init__(self, device: Device) -> None: ...
    @property
    def handle(self) -> int: ...
    def record(self, device: Device, stream: int) -> None: ...
    def synchronize(self, device: Device) -> None: ...

class Transfer:
    @property
    def sequence(self) -> int: ...
    @property
    def event(self) -> int: ...
    @property
    def holding(self) -> bool:
        """Whether the staging slot is still held (until the copies ran)."""
    def done(self) -> bool: ...
    def synchronize(self) -> None: ...
    def wait_on(self, stream: int) -> None:
        """Work enqueued on ``stream`` after this waits for the copies."""

class CopyEngine:
    def __init__(self, device: Device) -> None: ...
    @property
    def stream(self) -> int: ...
    @property
    def device(self) -> Device: ...
    def stage(self, batch: Batch, destinations: list[int]) -> Transfer: ...
    def copy(
        self,
        sources: list[int],
        destinations: list[int],
        sizes: list[int],
        batch: Batch | None = None,
    ) -> Transfer: ...
    def stats(self) -> dict[str, int]: ...
    def first_error(self) -> str: ...

class BatchFeedback:
    def __init__(
        self,
        batch_size: int,
        compute_ns: int = 0,
        collate_ns: int = 0,
        peak_memory_bytes: int = 0,
        reclaimable_bytes: int = 0,
        out_of_memory: bool = False,
        bucket: int = 0,
        tokens: int = 0,
    ) -> None: ...

class SizingPolicy:
    def next_batch_size(
        self,
        queued: int,
        bytes_per_sample: int,
        memory_available_bytes: int,
        memory_total_bytes: int = 0,
        utilization: float = 0.0,
        bucket: int = 0,
        longest: int = 0,
    ) -> int: ...
    def on_feedback(self, feedback: BatchFeedback) -> None: ...
    def padding_allowance(self) -> float:
        """Padded tokens a request may add to a batch (negative: no limit)."""
    def state(self) -> dict[str, Any]: ...

class SizingController(SizingPolicy):
    def __init__(
        self,
        min_batch_size: int,
        max_batch_size: int,
        latency_slo_ms: float | None = None,
        knee_tolerance: float = 0.05,
        memory_margin_fraction: float = 0.05,
        staged_memory_fraction: float = 0.25,
        utilization_target: float = 0.0,
        history: int = 64,
        probe_after: int = 16,
        probe_step: float = 0.1,
        tokens: bool = False,
    ) -> None: ...
    def export_state(self) -> dict[str, Any]: ...
    def import_state(self, learned: dict[str, Any]) -> None: ...

class StatsRecorder:
    def __init__(self, ring_capacity: int = 4096) -> None: ...
    def reset(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    def record_outcome(self, priority: int, outcome: str, count: int = 1) -> None:
        """outcome: "timed_out", "cancelled" or "failed"."""

class Batch:
    @property
    def sequence(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def ids(self) -> list[int]: ...
    @property
    def first_id(self) -> int: ...
    @property
    def target(self) -> int: ...
    @property
    def collate_ns(self) -> int: ...
    @property
    def reason(self) -> str:
        """Why it was released: "full", "max_delay", "deadline" or "drain"."""
    @property
    def lengths(self) -> list[int]:
        """Padded leaves: each sample's length."""
    @property
    def padded_length(self) -> int: ...
    @property
    def expired(self) -> list[int]:
        """Ids of requests whose timeout passed before they were formed (size may be 0)."""
    @property
    def released_ns(self) -> int:
        """now_ns() when the consumer could first have had it (for report_dispatch)."""
    def leaf(self, index: int) -> CapsuleType: ...

class BatchFormer:
    def __init__(
        self,
        leaves: list[LeafDescriptor],
        capacity: int,
        prefetch_depth: int,
        pool: StagingPool,
        policy: SizingPolicy,
        telemetry: Telemetry,
        stats: StatsRecorder,
        max_delay_ms: float | None = None,
        aging_ms: float = 100.0,
        pad_to_multiple_of: int = 1,
        max_tokens: int = 0,
        bucket_window: int = 0,
        group_queued: bool = False,
        collate: bool = True,
        own_thread: bool = True,
    ) -> None:
        """max_delay_ms None: a short queue waits for the target; 0: dispatched at once."""
    def push(
        self, first_id: int, count: int, addresses: list[int], lengths: list[int] = ...
    ) -> int:
        """Requests first_id .. first_id + count - 1, leaf addresses request-major."""
    def submit(
        self,
        id: int,
        addresses: list[int],
        priority: int = 0,
        timeout_ns: int = -1,
        length: int = 0,
    ) -> bool:
        """One request; False when max_queued requests wait or the input is closed."""
    def submit_one(self, id: int, address: int, priority: int = 0, timeout_ns: int = -1) -> bool:
        """submit() for a sample with a single leaf."""
    def submit_many(
        self,
        ids: list[int],
        addresses: list[int],
        priority: int = 0,
        timeout_ns: int = -1,
        lengths: list[int] = ...,
    ) -> int:
        """Returns how many were accepted (a prefix)."""
    def wait_for_room(self, timeout_s: float | None = None) -> bool: ...
    def close_input(self) -> None: ...
    def next_batch(self, timeout_s: float | None = None) -> Batch | None: ...
    def next_plan(
        self,
        sequence: int,
        batch_size: int,
        compute_ns: int,
        collate_ns: int,
        peak_memory_bytes: int,
        reclaimable_bytes: int,
        first_id: int,
        count: int,
        input_done: bool,
    ) -> tuple[int, tuple[int, int, int, int] | None]:
        """A former that does not collate: reports the last batch's feedback (batch_size 0:
        none), pushes requests first_id .. first_id + count - 1, closes the input when
        input_done, and forms the next batch. Returns (requests accepted, (first id, size,
        sequence, target) or None at the end); no batch is formed unless all were accepted."""
    def wait_late(self, timeout_s: float | None = None) -> tuple[list[int], list[int]] | None:
        """Sleeps until waiting requests pass their deadlines: (expired, late in a formed
        batch not yet delivered); None once closed."""
    def report_feedback(self, sequence: int, feedback: BatchFeedback) -> None: ...
    def report_dispatch(self, released_ns: int) -> None:
        """The batch released at released_ns is dispatched now (deadline releases allow
        for this delay)."""
    @property
    def bucket(self) -> int: ...
    @property
    def sample_bytes(self) -> int: ...
    def close(self) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def backlog(self) -> int:
        """Requests queued or in batches formed ahead, not yet handed to the consumer."""

def now_ns() -> int: ...

class DeviceScheduler:
    exclusive: ClassVar[int]
    def __init__(
        self,
        concurrency: int,
        aging_ms: float,
        margin_fraction: float,
        telemetry: Telemetry,
        max_hold_ms: float = 50.0,
    ) -> None: ...
    def try_acquire(self, task: int, priority: int, reservation_bytes: int) -> bool: ...
    def acquire(
        self,
        task: int,
        priority: int,
        reservation_bytes: int,
        timeout_s: float | None = None,
        since_ns: int | None = None,
    ) -> bool:
        """since_ns: when the batch began waiting (now_ns()), kept across retries."""
    def release(
        self, task: int, priority: int, reservation_bytes: int, more_queued: bool = False
    ) -> None: ...
    def close(self) -> None: ...
    def state(self) -> dict[str, Any]: ...

def collate(
    leaves: list[LeafDescriptor],
    addresses: list[int],
    batch_size: int,
    pool: StagingPool,
    lengths: list[int] = ...,
    pad_to_multiple_of: int = 1,
) -> Batch: ...
