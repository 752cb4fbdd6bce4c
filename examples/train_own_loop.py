"""A training loop of your own over dynbatch micro-batches, out-of-memory errors included.

``processor.steps(data, samples_per_step=64)`` yields micro-batches that add up to optimizer
steps of exactly 64 samples; the engine sizes them. When one runs out of memory, zero the
gradients and call ``report_oom()``: the whole step comes again in smaller micro-batches and
the lower ceiling holds from then on. Here the "device" holds 40 samples (a model that raises
above that), on scikit-learn's digits; the result equals a plain batch-64 loop.

    python examples/train_own_loop.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import dynbatch as ds


class PretendOutOfMemory(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError on a machine without a GPU."""


class SmallDeviceMLP(torch.nn.Module):
    """The MLP, on a pretend device that runs out of memory above 40 samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        ).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 40:
            raise PretendOutOfMemory(f"a batch of {len(x)} does not fit")
        return self.net(x)


def main() -> None:
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float64) / 16
    targets = torch.tensor(digits.target)
    model = SmallDeviceMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    # min_batch_size=64: micro-batches start as whole steps, which the pretend device refuses.
    processor = ds.DynamicBatchProcessor(min_batch_size=64, oom_errors=(PretendOutOfMemory,))
    steps = processor.steps(ds.paired(inputs, targets), samples_per_step=64)
    reruns = 0
    for micro in steps:
        x, y = micro.data
        try:
            loss = F.cross_entropy(model(x), y) * micro.weight  # its share of the step
            loss.backward()
        except Exception as error:
            if not processor.is_out_of_memory(error):
                raise
            optimizer.zero_grad()  # the step's earlier micro-batches ran: drop their part
            steps.report_oom()  # the step comes again, in smaller micro-batches
            reruns += 1
            continue
        if micro.last:
            optimizer.step()
            optimizer.zero_grad()
    stats = processor.stats()
    processor.close()

    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).double()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for start in range(0, len(inputs), 64):
        plain.zero_grad()
        F.cross_entropy(
            reference(inputs[start : start + 64]), targets[start : start + 64]
        ).backward()
        plain.step()
    same = all(
        torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        for a, b in zip(model.net.parameters(), reference.parameters(), strict=True)
    )
    print(
        f"{len(inputs)} samples in {steps_done(processor)} steps of 64; {reruns} step(s) run "
        f"again after running out of memory; size ceiling now {stats.oom_ceiling}; "
        f"parameters {'equal' if same else 'DIFFER FROM'} a plain batch-64 loop"
    )


def steps_done(processor: ds.DynamicBatchProcessor) -> int:
    return int(processor.state_dict()["training"]["step"])


if __name__ == "__main__":
    main()
