"""Serving concurrent callers: submit() from threads, infer() from asyncio, two tasks sharing
one device through a Scheduler. Runs on CPU in a second or two."""

from __future__ import annotations

import asyncio
import threading

import torch

import dynbatch as ds

torch.manual_seed(0)
classifier = torch.nn.Linear(32, 4).eval()
embedder = torch.nn.Linear(32, 8).eval()


@torch.no_grad()
def classify(batch: torch.Tensor) -> torch.Tensor:
    return classifier(batch).argmax(1)


@torch.no_grad()
def embed(batch: torch.Tensor) -> torch.Tensor:
    return embedder(batch)


def main() -> None:
    scheduler = ds.Scheduler("cpu")
    with (
        ds.DynamicBatchProcessor(
            model=classify, max_batch_size=64, scheduler=scheduler, task_priority=1
        ) as classifier_bp,
        ds.DynamicBatchProcessor(model=embed, max_batch_size=64, scheduler=scheduler) as embed_bp,
    ):
        # Threads submitting one request at a time: each gets a Future.
        answers: list[int] = []

        def caller() -> None:
            for _ in range(200):
                answers.append(int(classifier_bp.submit(torch.randn(32)).result()))

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()

        # asyncio callers on the other task meanwhile.
        async def many() -> list[torch.Tensor]:
            return await asyncio.gather(*(embed_bp.infer(torch.randn(32)) for _ in range(500)))

        embeddings = asyncio.run(many())
        for thread in threads:
            thread.join()

        # A request that waits too long never reaches the model.
        late = classifier_bp.submit(torch.randn(32), timeout=0.0)
        try:
            late.result()
        except ds.RequestTimeout as error:
            print("timed out as asked:", error)

        print(f"{len(answers)} classifications, {len(embeddings)} embeddings")
        print(classifier_bp.stats())


if __name__ == "__main__":
    main()
