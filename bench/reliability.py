"""Figures behind issue 12 (reliability), each printed by one subcommand:

    python bench/reliability.py deadline   # RequestTimeout lateness while the model is busy
    python bench/reliability.py close      # close(drain=False) time while the model is busy
    python bench/reliability.py dropped    # threads and memory after dropping processors
    python bench/reliability.py cycles     # resident vs live memory over create/use/close

Timings are wall-clock on a shared machine: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import torch

import dynbatch as ds

MODEL_S = 2.8  # the busy model of the report


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


def in_use_mib() -> float:
    """glibc's chunks in use (what is live), in MiB; -1 without mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return -1.0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def busy_model(batch: torch.Tensor) -> torch.Tensor:
    time.sleep(MODEL_S)
    return batch


def deadline() -> None:
    bp = ds.DynamicBatchProcessor(model=busy_model, max_batch_size=1, max_delay_ms=0.0)
    bp.submit(torch.ones(4))
    time.sleep(0.05)  # the first batch is in the model
    for _ in range(3):
        submitted = time.monotonic()
        late = bp.submit(torch.ones(4), timeout=0.2)
        error = late.exception(30)
        ended = time.monotonic() - submitted
        print(
            f"timeout=0.2 s with the model busy for {MODEL_S} s: {type(error).__name__} "
            f"after {ended * 1e3:.1f} ms ({(ended - 0.2) * 1e3:+.1f} ms after its deadline)"
        )
    bp.close(drain=False)


def close() -> None:
    bp = ds.DynamicBatchProcessor(model=busy_model, max_batch_size=1, max_delay_ms=0.0)
    running = bp.submit(torch.ones(4))
    queued = bp.submit_many([torch.ones(4) for _ in range(100)])
    time.sleep(0.05)
    started = time.monotonic()
    bp.close(drain=False)
    took = time.monotonic() - started
    ended = sum(f.done() for f in [running, *queued])
    print(
        f"close(drain=False) with the model busy for {MODEL_S} s: returned in "
        f"{took * 1e3:.1f} ms, {ended} of {1 + len(queued)} requests ended"
    )


def dropped(count: int) -> None:
    # The first processor starts process-wide threads (the shared scheduler's sampler, torch's
    # pool): one closed processor first, so the baseline holds them.
    with ds.DynamicBatchProcessor(model=lambda b: b * 2, max_delay_ms=0.0) as warm:
        warm.submit(torch.ones(4)).result(30)
    del warm
    gc.collect()
    base_threads, base_resident = threads(), resident_mib()
    for i in range(count):
        bp = ds.DynamicBatchProcessor(model=lambda b: b * 2, max_delay_ms=0.0)
        bp.submit(torch.full((4,), float(i))).result(30)
        del bp
    gc.collect()
    print(f"right after dropping {count}: {threads() - base_threads:+d} threads")
    end = time.monotonic() + 60
    while threads() > base_threads and time.monotonic() < end:
        time.sleep(0.05)
        gc.collect()
    print(
        f"settled: {threads() - base_threads:+d} threads, "
        f"{resident_mib() - base_resident:+.0f} MiB resident"
    )


def cycles(count: int) -> None:
    samples = [torch.randn(16384) for _ in range(256)]  # 16 MiB batches
    print(f"before: {resident_mib():.0f} MiB resident, {in_use_mib():.1f} MiB in use")
    for i in range(count):
        bp = ds.DynamicBatchProcessor(model=lambda b: b * 2, max_batch_size=1024)
        for future in bp.submit_many(samples):
            future.result(30)
        bp.close()
        del bp
        if (i + 1) % 20 == 0:
            gc.collect()
            print(
                f"after {i + 1:3d} cycles: {resident_mib():.0f} MiB resident, "
                f"{in_use_mib():.1f} MiB in use, {sys.getallocatedblocks()} Python blocks"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["deadline", "close", "dropped", "cycles"])
    parser.add_argument("--count", type=int, default=None, help="processors or cycles")
    args = parser.parse_args()
    if args.figure == "deadline":
        deadline()
    elif args.figure == "close":
        close()
    elif args.figure == "dropped":
        dropped(args.count or 400)
    else:
        cycles(args.count or 200)


if __name__ == "__main__":
    main()
