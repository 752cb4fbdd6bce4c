"""Exceptions raised by dynbatch."""

from __future__ import annotations

__all__ = [
    "DynbatchError",
    "InvalidSampleError",
    "ProcessorClosed",
    "ProcessorForked",
    "QueueFull",
    "RequestTimeout",
    "UnsupportedLeafError",
]


class DynbatchError(Exception):
    """Base class of every error dynbatch raises itself."""


class InvalidSampleError(DynbatchError, ValueError):
    """A sample that cannot join a batch: its structure, a leaf's shape or a dtype differs.

    ``index`` is the sample's position in the input, ``path`` the leaf inside it (``""`` for
    the sample itself), so the offending input can be found without a debugger.
    """

    def __init__(self, index: int, path: str, problem: str, *, noun: str = "sample") -> None:
        where = f"{noun} {index}" + (f", leaf {path}" if path else "")
        super().__init__(f"{where}: {problem}")
        self.index = index
        self.path = path
        self.problem = problem


class UnsupportedLeafError(InvalidSampleError, TypeError):
    """A leaf of a type dynbatch cannot stack (a string, None, an arbitrary object...)."""


class QueueFull(DynbatchError):
    """``submit`` found ``max_queue_size`` requests already waiting (after ``block_timeout``
    seconds of waiting for room, when one was given; at once from a done-callback running on
    the processor's worker, which is what makes room)."""


class RequestTimeout(DynbatchError, TimeoutError):
    """A request's ``timeout`` passed before it was dispatched; it never reached the model."""


class ProcessorClosed(DynbatchError):
    """The processor was closed: no new requests, and ``close(drain=False)`` ends every
    request not done with this error (those of a batch in the model too: it is abandoned)."""


class ProcessorForked(ProcessorClosed):
    """The processor (or scheduler) was created before ``fork()``: it belongs to the parent
    process, whose threads, queues and device state do not exist in this one. Create a new
    one in this process (in a ``DataLoader`` worker: in ``worker_init_fn`` or in the dataset).
    Requests the parent had queued end with this error in the child; the parent serves them."""
