"""Inference split across processes: each rank batches its share, rank 0 gets every output.

Run it on 2 processes, or on one for the same result:

    torchrun --nproc-per-node=2 examples/distributed_inference.py
    python examples/distributed_inference.py
"""

import os

import torch
import torch.distributed as dist

import dynbatch as ds
from dynbatch.distributed import gather, shard


def main() -> None:
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    # Seeded, so every rank builds the same model and the same inputs.
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 4)
    inputs = [torch.randn(32) for _ in range(1000)]

    with ds.DynamicBatchProcessor(max_batch_size=64) as processor, torch.no_grad():
        outputs = processor.map(model, shard(inputs))
        stats = processor.stats()
    print(
        f"rank {rank}: {stats.samples} samples in {stats.batches} batches, "
        f"mean batch size {stats.mean_batch_size:.1f}"
    )

    gathered = gather(outputs)
    if gathered is not None:
        with torch.no_grad():
            expected = model(torch.stack(inputs))
        if not torch.allclose(torch.stack(gathered), expected, atol=1e-6):
            raise SystemExit("gathered outputs differ from the model run on all inputs")
        print(f"rank {rank}: {len(gathered)} outputs in input order, world size {world}")

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
