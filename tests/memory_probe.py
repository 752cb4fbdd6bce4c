"""What is live versus what the allocators keep cached, for tests that check memory stays flat.

The resident size moves with fragmentation: glibc keeps freed memory cached per thread arena
(every new thread gets one) and Python keeps partly used object arenas, so two rounds of the
same work can differ by tens of MiB without anything being kept. `live()` counts only what is
allocated: glibc's chunks in use (mallinfo2's uordblks, plus hblkhd, its mmapped chunks) and
Python's allocated object blocks. A leak grows these round after round; fragmentation does
not."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True)
class Live:
    native_bytes: int  # glibc chunks in use; -1 without mallinfo2 (not glibc >= 2.33)
    python_blocks: int  # sys.getallocatedblocks()


def live() -> Live:
    native = -1
    with contextlib.suppress(OSError, AttributeError):
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        native = int(info.uordblks + info.hblkhd)
    return Live(native, sys.getallocatedblocks())


def resident_bytes(trim: bool = True) -> int:
    """The resident size, after glibc hands the free pages it caches back (malloc_trim)."""
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
