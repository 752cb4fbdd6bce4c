"""Batches onto a device: copies on the core's own stream, overlapped with the model.

A :class:`DeviceTarget` is what an engine calls once per batch when ``device=`` is set::

    target = DeviceTarget("cuda:0")
    pool = target.staging_pool(slots)                 # pinned staging slots for the former
    staged = target.stage(leaves, batch)              # enqueue the copies; returns at once
    ...                                               # stage the next batch, run the model
    device_leaves = staged.wait()                     # the current stream waits on the copy

``stage`` allocates each leaf's destination with torch (its caching allocator, on the core's
copy stream), has the core copy every leaf on its own stream and record an event; the core
holds the batch's staging slot until the copy ran. ``wait`` makes the caller's current torch
stream wait on that event (the handles cross as integers) and marks the tensors for that
stream (``record_stream``), so nothing is freed, or reused by the allocator, while the copy or
the model may still touch it. :func:`prefetch` keeps the copies ``depth`` batches ahead of the
model. Samples already on the device are stacked by one gather launch per leaf
(:meth:`DeviceTarget.gather`, :meth:`DeviceTarget.gather_pad`).

``DeviceTarget(SIMULATED_DEVICE)`` does the same against the core's simulated device (host
memory as device memory, a worker thread per stream, copies checked against reuse, simulated
time): batches land in CPU tensors and ``wait`` blocks the host until the copy ran. It is how
this logic is tested on machines without a GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _core
from .info import build_info
from .padding import pad_element_bytes, padded_length

__all__ = [
    "SIMULATED_DEVICE",
    "DeviceError",
    "DeviceTarget",
    "SimulatedDeviceConfig",
    "StagedBatch",
    "prefetch",
]

SIMULATED_DEVICE = "dynbatch-sim"

DeviceError = _core.DeviceError  # a device call failed (naming the call and the device)


@dataclass(frozen=True)
class SimulatedDeviceConfig:
    """The simulated device's behaviour: each copy or gather takes a delay drawn uniformly from
    ``copy_delay_us`` (seeded); ``real_time`` sleeps it too (else only simulated time moves);
    ``pinned_limit_bytes`` makes page-locked allocation fail beyond it."""

    copy_delay_us: tuple[float, float] = (0.0, 0.0)
    seed: int = 0
    real_time: bool = True
    pinned_limit_bytes: int | None = None


def _cuda_device_of(device: object) -> tuple[torch.device, int]:
    """The CUDA device ``device`` names, with its index, or a ValueError saying why not."""
    try:
        # An int means a CUDA index (torch.device(0) asks for an accelerator, which may be absent).
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device: {error}") from None
    if parsed.type != "cuda":
        raise ValueError(
            f"device={device!r}: batches can be sent to a CUDA device ('cuda', 'cuda:N') or, in "
            f"tests, to {SIMULATED_DEVICE!r}; not to {parsed.type!r}"
        )
    info = build_info()
    if not info["cuda_compiled"]:
        raise ValueError(
            f"device={device!r}: this build of dynbatch has no CUDA (nvcc was not found when it "
            "was built); reinstall it on a machine with the CUDA toolkit"
        )
    if not info["gpu_usable"]:
        raise ValueError(f"device={device!r}: no usable CUDA GPU here ({info['gpu_detail']})")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r}: torch {torch.__version__} cannot use CUDA here (a CPU-only "
            "build of torch?), so it cannot allocate the batches"
        )
    index = parsed.index if parsed.index is not None else torch.cuda.current_device()
    count = int(info["gpu_count"])
    if not 0 <= index < count:
        raise ValueError(
            f"device={device!r}: no such device; this machine has {count} CUDA device(s)"
        )
    return torch.device("cuda", index), index


class StagedBatch:
    """One batch whose copies were enqueued: :meth:`wait` hands out its device leaves."""

    __slots__ = ("_copied", "_keep", "_outputs", "_target", "_transfer")

    def __init__(
        self,
        target: DeviceTarget,
        transfer: _core.Transfer | None,
        outputs: list[torch.Tensor],
        copied: list[bool],
        keep: list[Any],
    ) -> None:
        self._target = target
        self._transfer = transfer
        self._outputs = outputs
        self._copied = copied
        self._keep = keep  # host leaves that are not in the staging slot: alive until copied

    @property
    def sequence(self) -> int:
        """The copy engine's number of this transfer (-1 when nothing needed a copy)."""
        return -1 if self._transfer is None else self._transfer.sequence

    def done(self) -> bool:
        """Whether the copies ran (never blocks)."""
        return self._transfer is None or self._transfer.done()

    def wait(self) -> list[torch.Tensor]:
        """The batch's leaves on the device, safe to use on the caller's current stream.

        CUDA: the current stream waits on the copy's event (the host does not block) and each
        tensor is marked for it. Simulated: the host blocks until the copy ran."""
        if self._transfer is not None:
            self._target._make_current_stream_wait(self._transfer, self._outputs, self._copied)
        return list(self._outputs)

    def _release(self) -> None:
        self._keep = []


class DeviceTarget:
    """Copies batches to one device on the core's own stream (see the module docstring).

    ``device``: ``"cuda"``, ``"cuda:N"``, an int, a ``torch.device``, or
    :data:`SIMULATED_DEVICE` (tests; ``simulated`` configures it). Raises ``ValueError`` naming
    the argument when the device cannot be used (no CUDA in this build or in torch, no GPU, an
    index that does not exist) and ``TypeError`` for something that is not a device.
    Not thread-safe: one engine thread calls it.
    """

    def __init__(
        self,
        device: str | int | torch.device,
        *,
        simulated: SimulatedDeviceConfig | None = None,
    ) -> None:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            raise TypeError(
                "device must be 'cuda', 'cuda:N', a device index, a torch.device or "
                f"{SIMULATED_DEVICE!r}, got {type(device).__name__}"
            )
        self._simulated: _core.SimulatedDevice | None = None
        core: _core.Device
        if device == SIMULATED_DEVICE:
            config = simulated or SimulatedDeviceConfig()
            low, high = config.copy_delay_us
            self._simulated = _core.SimulatedDevice(
                min_delay_us=low,
                max_delay_us=high,
                seed=config.seed,
                real_time=config.real_time,
                pinned_limit_bytes=config.pinned_limit_bytes,
            )
            core = self._simulated
            self._device = torch.device("cpu")  # simulated device memory is host memory
            self._consumer: _core.Stream | None = _core.Stream(core)
            self._consumer_done: _core.Event | None = _core.Event(core)
        else:
            if simulated is not None:
                raise ValueError(f"simulated= applies to device={SIMULATED_DEVICE!r} only")
            self._device, index = _cuda_device_of(device)
            core = _core.cuda_device(index)
            self._consumer = None
            self._consumer_done = None
        self._core_device = core
        self._engine: _core.CopyEngine | None = _core.CopyEngine(core)
        self._pending: deque[StagedBatch] = deque()

    @property
    def device(self) -> torch.device:
        """Where the batches land (``cpu`` for the simulated device)."""
        return self._device

    @property
    def name(self) -> str:
        """The core's name of the device: ``"cuda:0 (NVIDIA H100 ...)"`` or ``"simulated"``."""
        return self._core_device.name

    @property
    def core_device(self) -> _core.Device:
        """The core's device: pass it to ``_core.StagingPool(slots, device=...)``."""
        return self._core_device

    @property
    def simulated_device(self) -> _core.SimulatedDevice:
        """The simulated device (its clock, failures, wait log); only for a simulated target."""
        if self._simulated is None:
            raise ValueError(f"{self.name} is not the simulated device")
        return self._simulated

    @property
    def copy_stream(self) -> int:
        """The core's copy stream, as an integer handle."""
        return self._live_engine().stream

    def staging_pool(self, slots: int) -> _core.StagingPool:
        """A staging pool whose slots are page-locked for this device (pageable, counted in
        its stats as ``pinned_fallbacks``, when pinning fails)."""
        return _core.StagingPool(slots, device=self._core_device)

    def stage(
        self, leaves: Sequence[torch.Tensor], batch: _core.Batch | None = None
    ) -> StagedBatch:
        """Enqueues one copy per host leaf; returns at once.

        ``leaves``: the batch's tensors in any order (CPU tensors are copied; tensors already
        on the target device pass through). ``batch``: the core batch whose staging slot the
        leaves live in; the core holds that slot until the copies ran. Leaves outside the slot
        (numbers, lengths) are kept alive here until then."""
        engine = self._live_engine()
        self._forget_finished()
        outputs: list[torch.Tensor] = []
        copied: list[bool] = []
        keep: list[Any] = []
        sources: list[int] = []
        destinations: list[int] = []
        sizes: list[int] = []
        with self._allocation_stream():
            for index, leaf in enumerate(leaves):
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(f"leaf {index} is a {type(leaf).__name__}, not a tensor")
                if leaf.device == self._device and self._simulated is None:
                    outputs.append(leaf)  # already there
                    copied.append(False)
                    continue
                if leaf.device.type != "cpu":
                    raise ValueError(
                        f"leaf {index} is on {leaf.device}; the target is {self._device} "
                        "(only host tensors are copied)"
                    )
                host = leaf if leaf.is_contiguous() else leaf.contiguous()
                out = torch.empty(host.shape, dtype=host.dtype, device=self._device)
                outputs.append(out)
                copied.append(True)
                keep.append(host)
                keep.append(out)
                nbytes = host.numel() * host.element_size()
                if nbytes:
                    sources.append(host.data_ptr())
                    destinations.append(out.data_ptr())
                    sizes.append(nbytes)
        transfer = engine.copy(sources, destinations, sizes, batch) if any(copied) else None
        staged = StagedBatch(self, transfer, outputs, copied, keep)
        if transfer is not None:
            self._pending.append(staged)
        return staged

    def to_device(
        self, leaves: Sequence[torch.Tensor], batch: _core.Batch | None = None
    ) -> list[torch.Tensor]:
        """``stage(leaves, batch).wait()``: no overlap, for one-off use."""
        return self.stage(leaves, batch).wait()

    def gather(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(samples)`` of samples already on the device, in one launch."""
        first = self._check_samples(samples, padded=False)
        out = torch.empty((len(samples), *first.shape), dtype=first.dtype, device=self._device)
        contiguous = [s.contiguous() for s in samples]
        self._launch_gather(contiguous, out, row_bytes=first.numel() * first.element_size())
        return out

    def gather_pad(
        self,
        samples: Sequence[torch.Tensor],
        padding_value: float = 0.0,
        pad_to_multiple_of: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pad_sequence(samples, batch_first=True, padding_value=...)`` of samples already on
        the device (first dimensions may differ), in one launch; the padded length is rounded
        up to ``pad_to_multiple_of``. Returns the batch and the lengths (int64, on the host)."""
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int):
            raise TypeError("pad_to_multiple_of must be an int")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        first = self._check_samples(samples, padded=True)
        lengths = [int(s.shape[0]) for s in samples]
        rows = padded_length(max(lengths), pad_to_multiple_of)
        rest = tuple(first.shape[1:])
        out = torch.empty((len(samples), rows, *rest), dtype=first.dtype, device=self._device)
        row_bytes = first.element_size()
        for extent in rest:
            row_bytes *= extent
        pad = pad_element_bytes(padding_value, first.dtype, "")
        contiguous = [s.contiguous() for s in samples]
        if row_bytes and rows:
            self._launch_gather(contiguous, out, row_bytes, rows, lengths, pad)
        return out, torch.tensor(lengths, dtype=torch.int64)

    def synchronize(self) -> None:
        """Blocks until every staged copy ran; its host leaves are let go."""
        while self._pending:
            staged = self._pending[0]
            if staged._transfer is not None:
                staged._transfer.synchronize()
            staged._release()
            self._pending.popleft()

    def stats(self) -> dict[str, Any]:
        """The copy engine's counters; the simulated device's under ``"simulated"``."""
        out: dict[str, Any] = dict(self._live_engine().stats())
        out["pending"] = len(self._pending)
        if self._simulated is not None:
            out["simulated"] = self._simulated.stats()
        return out

    def close(self) -> None:
        """Waits for the copies in flight and stops the engine (idempotent)."""
        if self._engine is None:
            return
        try:
            self.synchronize()
        except DeviceError:
            pass  # a lost device: its copies will never run, and wait() already said so
        finally:
            self._pending.clear()
            self._engine = None

    def __enter__(self) -> DeviceTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceTarget({self.name!r})"

    # -- internals --------------------------------------------------------------------------

    def _live_engine(self) -> _core.CopyEngine:
        if self._engine is None:
            raise RuntimeError("this DeviceTarget was closed")
        return self._engine

    def _forget_finished(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft()._release()

    def _allocation_stream(self) -> Any:
        """CUDA: allocate destinations on the copy stream, so a block the allocator hands out
        is free in that stream's order; the consumer's use is covered by ``record_stream``."""
        if self._simulated is not None:
            return _NoStream()
        stream = torch.cuda.ExternalStream(  # type: ignore[no-untyped-call]
            self._live_engine().stream, device=self._device
        )
        return torch.cuda.stream(stream)

    def _make_current_stream_wait(
        self, transfer: _core.Transfer, outputs: list[torch.Tensor], copied: list[bool]
    ) -> None:
        if self._simulated is not None:
            transfer.synchronize()  # no torch stream: the host waits before the model runs
            self._forget_finished()
            return
        current = torch.cuda.current_stream(self._device)
        transfer.wait_on(current.cuda_stream)
        for out, was_copied in zip(outputs, copied, strict=True):
            if was_copied:
                out.record_stream(current)

    def _check_samples(self, samples: Sequence[torch.Tensor], *, padded: bool) -> torch.Tensor:
        if isinstance(samples, torch.Tensor) or not isinstance(samples, Sequence):
            raise TypeError("samples must be a sequence of tensors")
        if not samples:
            raise ValueError("samples is empty: there is nothing to gather")
        first = samples[0]
        for index, sample in enumerate(samples):
            if not isinstance(sample, torch.Tensor):
                raise TypeError(f"sample {index} is a {type(sample).__name__}, not a tensor")
            if sample.device != self._device:
                raise ValueError(
                    f"sample {index} is on {sample.device}; the target is {self._device}"
                )
            if sample.dtype != first.dtype:
                raise ValueError(
                    f"sample {index} has dtype {sample.dtype}, sample 0 has {first.dtype}"
                )
            if padded:
                if sample.dim() == 0 or sample.shape[1:] != first.shape[1:]:
                    raise ValueError(
                        f"sample {index} has shape {tuple(sample.shape)}; padding needs at least "
                        f"one dimension and the trailing shape {tuple(first.shape[1:])} of sample 0"
                    )
            elif sample.shape != first.shape:
                raise ValueError(
                    f"sample {index} has shape {tuple(sample.shape)}, sample 0 has "
                    f"{tuple(first.shape)}"
                )
        return first

    def _launch_gather(
        self,
        samples: list[torch.Tensor],
        out: torch.Tensor,
        row_bytes: int,
        rows: int = 1,
        lengths: list[int] | None = None,
        pad: bytes = b"",
    ) -> None:
        if out.numel() == 0:
            return
        sources = [s.data_ptr() for s in samples]
        if self._simulated is None:
            stream = torch.cuda.current_stream(self._device).cuda_stream
            self._core_device.gather(
                stream, sources, out.data_ptr(), row_bytes, rows, lengths or [], pad
            )
            return
        assert self._consumer is not None and self._consumer_done is not None
        handle = self._consumer.handle
        self._core_device.gather(
            handle, sources, out.data_ptr(), row_bytes, rows, lengths or [], pad
        )
        self._consumer_done.record(self._core_device, handle)
        self._consumer_done.synchronize(self._core_device)


class _NoStream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def prefetch(
    target: DeviceTarget,
    batches: Iterable[tuple[Sequence[torch.Tensor], _core.Batch | None]],
    depth: int = 1,
) -> Iterator[list[torch.Tensor]]:
    """Yields each batch's device leaves (``StagedBatch.wait``), with the copies of the next
    ``depth`` batches already enqueued, so they run while the caller computes on this one.

    ``batches`` yields ``(leaves, core_batch_or_None)`` as :meth:`DeviceTarget.stage` takes."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    source = iter(batches)
    queue: deque[StagedBatch] = deque()
    while True:
        # This batch and the next `depth` are staged before this one goes to the model.
        while len(queue) < depth + 1:
            item = next(source, None)
            if item is None:
                break
            leaves, batch = item
            queue.append(target.stage(leaves, batch))
        if not queue:
            return
        yield queue.popleft().wait()
