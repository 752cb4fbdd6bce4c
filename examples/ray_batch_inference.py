"""Batch inference on Ray Data: two actors each build the model once and batch the rows they
receive with dynbatch. Needs Ray (pip install "dynbatch[ray]"); runs on CPU in seconds."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import ray
import torch

from dynbatch.ray import Predictor

ROWS = 10_000
FEATURES = 16


def build_classifier() -> Callable[[torch.Tensor], torch.Tensor]:
    """Runs once per actor: the place to load weights (and move the model to its GPU)."""
    torch.manual_seed(1)  # the same weights in every actor
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
    ).eval()
    frequencies = torch.arange(1, FEATURES + 1) / 10  # varied features from a row's id
    return lambda batch: model(4 * torch.sin(batch * frequencies)).argmax(1)


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False)
    started = time.perf_counter()
    # Row i's "data" is a vector of FEATURES copies of i: its id and its input at once.
    predictions = ray.data.range_tensor(ROWS, shape=(FEATURES,)).map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            model_factory=build_classifier,
            input_column="data",
            output_column="label",
            max_batch_size=256,
        ),
        compute=ray.data.ActorPoolStrategy(size=2),  # or concurrency=2 (deprecated in Ray 2.51)
        # Half a CPU each, so that the read task still gets one of this machine's two (else
        # the actors wait for blocks that nothing can read). On a cluster: 1, or num_gpus=1.
        num_cpus=0.5,
        batch_size=2048,  # rows per call; dynbatch sizes the model's batches within them
    )
    rows = predictions.take_all()
    elapsed = time.perf_counter() - started

    ids = [int(row["data"][0]) for row in rows]
    assert sorted(ids) == list(range(ROWS)), "every row comes back exactly once"
    labels = dict(zip(ids, (int(row["label"]) for row in rows), strict=True))
    with torch.inference_mode():
        inputs = torch.arange(ROWS).unsqueeze(1).expand(ROWS, FEATURES)
        expected = build_classifier()(inputs).tolist()
    assert [labels[i] for i in range(ROWS)] == expected, "batched labels match the model's"
    counts = dict(sorted(Counter(expected).items()))
    print(f"{ROWS} rows labelled by 2 actors in {elapsed:.1f} s; rows per label: {counts}")
    ray.shutdown()


if __name__ == "__main__":
    main()
