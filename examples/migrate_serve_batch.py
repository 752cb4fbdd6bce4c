"""From Ray Serve's ``@serve.batch`` to a DynamicBatchProcessor per replica, same answers.

Before: a fixed ``max_batch_size`` and ``batch_wait_timeout_s``, and the batching code inside
the deployment. After: ``dynbatch.ray.deployment`` builds the model once per replica and
batches concurrent requests at the size it measures (up to ``max_batch_size``), waiting at
most ``max_delay_ms``. Needs Ray Serve (pip install "dynbatch[ray]"); runs locally on CPU.
"""

from __future__ import annotations

import socket

import ray
import torch
from ray import serve

import dynbatch.ray

REQUESTS = 128


def load_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


@serve.deployment(max_ongoing_requests=64)
class Before:
    def __init__(self) -> None:
        self.model = load_model().eval()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, samples: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(self.model(torch.stack(samples)))

    async def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        return (await self.predict(sample)).clone()


After = dynbatch.ray.deployment(
    load_model, name="After", processor_options=dict(max_batch_size=32, max_delay_ms=5)
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        before = serve.run(Before.bind(), name="before", route_prefix="/before")
        after = serve.run(After.bind(), name="after", route_prefix="/after")
        samples = [
            torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(REQUESTS)
        ]
        # Every request is sent before any answer is awaited: they arrive together.
        expected = [response.result() for response in [before.remote(s) for s in samples]]
        answers = [response.result() for response in [after.remote(s) for s in samples]]
        assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(answers, expected, strict=True))
        stats = after.stats.remote().result()
        print(
            f"{REQUESTS} requests answered as with @serve.batch; dynbatch formed "
            f"{stats.batches} batches of {stats.mean_batch_size:.1f} on average"
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
