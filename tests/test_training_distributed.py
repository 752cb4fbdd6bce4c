"""fit on a DistributedDataParallel model, 2 gloo ranks under torchrun: the parameters equal one
process's with the same global step, and gradients are synchronised once per step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .training_models import assert_same_parameters, digits, fixed_batch_loop, mlp

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[1]

# Ranks size their micro-batches differently (rank 0 16 samples, rank 1 8): each
# rank runs its own number of micro-batches per step, synchronising on its last one only.
WORKER = """
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dynbatch as ds
from tests.training_models import cross_entropy, digits, mlp

dist.init_process_group("gloo")
rank = dist.get_rank()
inputs, targets = digits()
model = DistributedDataParallel(mlp())
syncs = []


def counting_allreduce(state, bucket):
    syncs.append(1)
    buffer = bucket.buffer()
    buffer /= dist.get_world_size()
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


model.register_comm_hook(None, counting_allreduce)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
mode = sys.argv[1]
size = 16 if rank == 0 else 8
with ds.DynamicBatchProcessor(max_batch_size=size, min_batch_size=size) as processor:
    result = processor.fit(
        model,
        optimizer,
        cross_entropy,
        ds.paired(inputs, targets),
        samples_per_step=64 if mode == "fixed" else "auto",
        epochs=1 if mode == "fixed" else 2,
    )
micro = sum(step.micro_batches for step in result)
print(f"rank {rank}: steps {len(result)} micro-batches {micro} syncs {len(syncs)}")
print(f"rank {rank}: sizes {[step.samples for step in result]}")
print(f"rank {rank}: samples {result.samples}")
if rank == 0:
    torch.save(model.module.state_dict(), sys.argv[2])
dist.destroy_process_group()
"""


def _two_ranks(script: Path, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*command, str(script), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout
    return result.stdout


def test_two_ranks_equal_one_process_with_the_same_global_step(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output = _two_ranks(script, "fixed", str(tmp_path / "params.pt"))
    # 1797 samples: 28 steps of 64 and one of 5; rank 0 takes 32 (3 of the last 5) in 2
    # micro-batches, rank 1 takes 32 (2) in 4; one synchronisation per step on each rank
    assert "rank 0: steps 29 micro-batches 57 syncs 29" in output
    assert "rank 1: steps 29 micro-batches 113 syncs 29" in output

    reference = mlp()
    fixed_batch_loop(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9),
        *digits(),
        64,
    )
    model = mlp(seed=5)
    model.load_state_dict(torch.load(tmp_path / "params.pt"))
    assert_same_parameters(model, reference)


def test_two_ranks_agree_on_adaptive_step_sizes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output = _two_ranks(script, "auto", str(tmp_path / "params.pt"))
    sizes = [line.split(": sizes ")[1] for line in output.splitlines() if ": sizes " in line]
    assert len(sizes) == 2 and sizes[0] == sizes[1]  # rank 0 decides, every rank follows
    assert "rank 0: samples 3594" in output and "rank 1: samples 3594" in output
