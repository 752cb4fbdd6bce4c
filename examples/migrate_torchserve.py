"""From TorchServe's server-side batching to dynbatch, keeping the handler's code.

TorchServe batches requests in its frontend (``batchSize`` and ``maxBatchDelay`` in the model's
config) and calls the handler with a list of requests. With dynbatch the handler takes one
request: ``preprocess`` and ``postprocess`` work on that request alone, and ``inference`` runs
on the batches dynbatch forms from concurrent requests, at a size it measures rather than a
fixed ``batchSize``. Any async web framework can call ``handle`` (see http_server.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

import dynbatch as ds


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


class TorchServeHandler:
    """Before: a TorchServe handler (``ts.torch_handler.base_handler.BaseHandler`` style),
    called by the frontend with up to ``batchSize`` requests."""

    def initialize(self) -> None:
        self.model = build_model().eval()

    def preprocess(self, requests: list[dict[str, Any]]) -> torch.Tensor:
        return torch.stack([torch.tensor(r["body"]["features"]) for r in requests])

    @torch.inference_mode()
    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).softmax(1)

    def postprocess(self, output: torch.Tensor) -> list[list[float]]:
        return output.tolist()

    def handle(self, requests: list[dict[str, Any]]) -> list[list[float]]:
        return self.postprocess(self.inference(self.preprocess(requests)))


class DynbatchHandler:
    """After: the same steps, per request; batching is dynbatch's. ``batchSize: 8`` and
    ``maxBatchDelay: 50`` become the upper bound and the longest wait."""

    def __init__(self) -> None:
        self.model = build_model().eval()
        self.processor = ds.DynamicBatchProcessor(
            model=self.inference, max_batch_size=8, max_delay_ms=50
        )

    def preprocess(self, request: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(request["body"]["features"])

    @torch.inference_mode()
    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).softmax(1)

    def postprocess(self, row: torch.Tensor) -> list[float]:
        return row.tolist()

    async def handle(self, request: dict[str, Any]) -> list[float]:
        return self.postprocess(await self.processor.infer(self.preprocess(request)))

    def close(self) -> None:
        self.processor.close()


async def serve_all(handler: DynbatchHandler, requests: list[dict[str, Any]]) -> list[Any]:
    return await asyncio.gather(*(handler.handle(request) for request in requests))


def main() -> None:
    generator = torch.Generator().manual_seed(1)
    requests = [
        {"body": {"features": torch.randn(8, generator=generator).tolist()}} for _ in range(200)
    ]

    before = TorchServeHandler()
    before.initialize()
    expected = [
        row for start in range(0, 200, 8) for row in before.handle(requests[start : start + 8])
    ]

    after = DynbatchHandler()
    answers = asyncio.run(serve_all(after, requests))
    stats = after.processor.stats()
    after.close()
    assert torch.allclose(torch.tensor(answers), torch.tensor(expected), atol=1e-6)
    print(
        f"{len(answers)} requests answered as before; {stats.batches} batches, "
        f"{stats.mean_batch_size:.1f} requests each on average"
    )


if __name__ == "__main__":
    main()
