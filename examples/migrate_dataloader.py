"""From a DataLoader loop with a fixed batch size to dynbatch, with the same results.

Before: the batch size is a guess, fixed for the whole run.
After: the DataLoader's workers still load and decode samples (batch_size=None hands them over
one at a time), and dynbatch forms the model's batches at the size it measures is best,
collating in its core while the model works on the previous batch.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

import dynbatch as ds


class Images(Dataset[torch.Tensor]):
    """Stands for a dataset that reads and decodes files: one tensor per index."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(index)
        return torch.rand(3, 32, 32, generator=generator)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).eval()


@torch.inference_mode()
def before(model: torch.nn.Module, dataset: Images) -> torch.Tensor:
    outputs = []
    for batch in DataLoader(dataset, batch_size=32, num_workers=2):
        outputs.append(model(batch))
    return torch.cat(outputs)


@torch.inference_mode()
def after(model: torch.nn.Module, dataset: Images) -> tuple[torch.Tensor, ds.Stats]:
    # batch_size=None: the workers yield single samples, in order; dynbatch batches them.
    samples = DataLoader(dataset, batch_size=None, num_workers=2)
    with ds.DynamicBatchProcessor(max_batch_size=256) as processor:
        outputs = processor.map(model, samples)  # one output per sample, in input order
        return torch.stack(outputs), processor.stats()


def main() -> None:
    model = build_model()
    dataset = Images(2000)
    expected = before(model, dataset)
    outputs, stats = after(model, dataset)
    assert torch.allclose(outputs, expected, atol=1e-5), "results differ"
    print(
        f"same {len(outputs)} outputs; DataLoader: batches of 32; dynbatch: "
        f"{stats.batches} batches, {stats.mean_batch_size:.1f} samples on average, "
        f"target now {stats.target_batch_size}"
    )


if __name__ == "__main__":
    main()
