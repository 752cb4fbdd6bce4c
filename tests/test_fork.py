"""A process that used dynbatch can fork (as DataLoader workers do on Linux): the child starts
with fresh core state, exits cleanly, and an inherited processor says it belongs to the parent.

Each case runs in its own interpreter, so a hang or an abort is a failed test, not a dead run;
the parent of each fork gives its child a bounded time and reports "hung" past it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork as DataLoader uses it")

PRELUDE = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    import dynbatch as ds

    def wait_child(pid, limit_s=30.0):
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "hung"
    """
)


def run(body: str) -> list[str]:
    """Runs PRELUDE + body in a fresh interpreter; returns its output lines."""
    script = PRELUDE + textwrap.dedent(body)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"the script hung; output so far: {error.stdout!r}") from None
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Exception ignored" not in done.stderr, done.stderr
    return done.stdout.splitlines()


def test_dataloader_workers_collate_after_the_parent_used_the_copy_helpers() -> None:
    lines = run(
        """
        from torch.utils.data import DataLoader
        big = [torch.ones(1 << 18) for _ in range(8)]  # 8 MiB: copied with the helper threads
        assert ds.collate(big).shape == (8, 1 << 18)
        data = [torch.full((1 << 18,), float(i)) for i in range(16)]
        loader = DataLoader(data, batch_size=8, collate_fn=ds.collate, num_workers=2,
                            timeout=20)
        sums = [batch[:, 0].sum().item() for batch in loader]
        print("sums", sums)
        """
    )
    assert lines == ["sums [28.0, 92.0]"]


def test_a_child_exits_cleanly_while_processors_live_in_the_parent() -> None:
    lines = run(
        """
        bp = ds.DynamicBatchProcessor(model=lambda b: b)
        assert bp.submit(torch.ones(3)).result(10).sum().item() == 3.0
        it = ds.DynamicBatchProcessor(max_batch_size=4)(torch.ones(2) for _ in range(100))
        next(it)  # a live iteration: its core thread runs in the parent
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal interpreter exit: finalizers and static destructors run
        print("child", wait_child(pid))
        print("parent still serves", bp.submit(torch.ones(3)).result(10).sum().item())
        """
    )
    assert lines == ["child 0", "parent still serves 3.0"]


def test_a_child_runs_its_own_processor_and_exits_cleanly() -> None:
    lines = run(
        """
        bp = ds.DynamicBatchProcessor(model=lambda b: b)
        assert bp.submit(torch.ones(3)).result(10).sum().item() == 3.0
        ds.collate([torch.ones(1 << 18) for _ in range(8)])  # the copy helpers start
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)  # torch's own OpenMP pool does not survive fork either
            child = ds.DynamicBatchProcessor(model=lambda b: b + 1, max_batch_size=8)
            served = sum(f.result(10).sum().item()
                         for f in child.submit_many([torch.ones(1 << 18) for _ in range(8)]))
            batches = list(ds.DynamicBatchProcessor(max_batch_size=8)(
                torch.ones(1 << 18) for _ in range(32)))
            big = ds.collate([torch.ones(1 << 18) for _ in range(8)])
            ok = served == 8 * 2.0 * (1 << 18) and len(batches) >= 4 and big.sum() == 1 << 21
            sys.exit(0 if ok else 3)  # `child` is left for interpreter exit to clean up
        print("child", wait_child(pid))
        """
    )
    assert lines == ["child 0"]


def test_an_inherited_processor_says_it_belongs_to_the_parent() -> None:
    lines = run(
        """
        import threading
        gate = threading.Event()
        def model(batch):
            gate.wait(30)
            return batch
        bp = ds.DynamicBatchProcessor(model=model, max_batch_size=1, max_delay_ms=0.0)
        running = bp.submit(torch.ones(3))
        queued = bp.submit(torch.ones(3))  # waits behind the running batch at the fork
        iterating = ds.DynamicBatchProcessor(max_batch_size=4)
        it = iterating(torch.ones(2) for _ in range(100))
        next(it)
        scheduler = ds.Scheduler("cpu")
        pid = os.fork()
        if pid == 0:
            def error_of(call):
                try:
                    call()
                except ds.ProcessorForked as error:
                    return "belongs to the parent" in str(error)
                return False
            checks = [
                error_of(lambda: bp.submit(torch.ones(3))),
                error_of(lambda: bp.submit_many([torch.ones(3)])),
                isinstance(queued.exception(10), ds.ProcessorForked),
                isinstance(running.exception(10), ds.ProcessorForked),
                error_of(lambda: next(it)),
                error_of(lambda: iterating.map(lambda b: b, [torch.ones(2)])),
                error_of(bp.stats),
            ]
            on_parents = ds.DynamicBatchProcessor(model=lambda b: b, scheduler=scheduler)
            checks.append(
                isinstance(on_parents.submit(torch.ones(3)).exception(10), ds.ProcessorForked)
            )
            on_parents.close()
            bp.close()  # does not touch the parent's threads
            iterating.close()
            scheduler.close()
            own = ds.DynamicBatchProcessor(model=lambda b: b * 2)
            checks.append(own.submit(torch.ones(3)).result(10).sum().item() == 6.0)
            own.close()
            print("child checks", checks, flush=True)
            sys.exit(0)
        print("child", wait_child(pid))
        gate.set()
        print("parent", running.result(10).sum().item(), queued.result(10).sum().item(),
              len(list(it)) > 0)
        bp.close()
        """
    )
    assert lines == [
        "child checks [True, True, True, True, True, True, True, True, True]",
        "child 0",
        "parent 3.0 3.0 True",
    ]
