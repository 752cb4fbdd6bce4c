"""The demo: fixed batch size 32 against dynamic batching, measured on this machine."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import _core
from .info import build_info
from .processor import DynamicBatchProcessor
from .stats import Stats, describe_learned_latency

__all__ = ["run_demo"]


def _mlp(width: int) -> torch.nn.Module:
    """Wide enough that per-sample cost falls with batch size on a CPU, as on a GPU."""
    return torch.nn.Sequential(
        torch.nn.Linear(784, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    ).eval()


@dataclass
class _Row:
    name: str
    mean_batch_size: float
    samples_per_second: float
    memory_use: float  # peak, as a share of what the device (here: the host) allows
    sizes: str
    learned: str = ""
    stats: Stats | None = field(default=None, repr=False)


def _run_processor(
    name: str, processor: DynamicBatchProcessor, model: torch.nn.Module, data: list[torch.Tensor]
) -> _Row:
    seen = 0
    with torch.inference_mode():
        for batch in processor(data):
            model(batch)
            seen += len(batch)
    if seen != len(data):
        raise RuntimeError(f"{name}: saw {seen} samples of {len(data)}")
    stats = processor.stats()
    top = sorted(stats.histogram.items(), key=lambda item: -item[1])[:4]
    processor.close()
    learned = (
        f"{name}: learned latency {describe_learned_latency(stats)}, knee {stats.knee}, "
        f"memory ceiling {stats.memory_ceiling}, OOM ceiling {stats.oom_ceiling}"
    )
    return _Row(
        name,
        stats.mean_batch_size,
        stats.throughput,
        stats.peak_memory_use,
        ", ".join(f"{size}x{count}" for size, count in top),
        learned,
        stats,
    )


def _run_stack_loop(model: torch.nn.Module, data: list[torch.Tensor], size: int) -> _Row:
    telemetry = _core.Telemetry.host(0.02)
    telemetry.reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        for offset in range(0, len(data), size):
            model(torch.stack(data[offset : offset + size]))
    elapsed = time.perf_counter() - start
    peak = telemetry.peak_rss_bytes
    total = telemetry.latest()["memory_total_bytes"]
    telemetry.close()
    batches = -(-len(data) // size)
    return _Row(
        f"torch.stack loop, {size}", len(data) / batches, len(data) / elapsed, peak / total, "-"
    )


def _table(rows: Iterable[_Row], baseline: float) -> str:
    header = (
        f"{'mode':<28} {'mean batch':>10} {'samples/s':>11} {'vs stack 32':>11} "
        f"{'memory use':>10}  most used sizes"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.name:<28} {row.mean_batch_size:>10.1f} {row.samples_per_second:>11,.0f} "
            f"{row.samples_per_second / baseline:>10.2f}x "
            f"{100 * row.memory_use:>9.1f}%  {row.sizes}"
        )
    return "\n".join(lines)


def run_demo(
    samples: int,
    width: int,
    max_batch_size: int,
    echo: Callable[[str], None],
    plot_path: str | None = None,
) -> None:
    info = build_info()
    echo(
        f"dynbatch {info['version']} (CUDA compiled: {info['cuda_compiled']}, "
        f"GPU usable: {info['gpu_usable']}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    echo(f"model: MLP 784-{width}-{width}-10 on the CPU; {samples} samples of shape (784,)\n")
    torch.manual_seed(0)
    model = _mlp(width)
    data = [torch.randn(784) for _ in range(samples)]
    with torch.inference_mode():  # first-call costs belong to no one's measurement
        model(torch.stack(data[:max_batch_size]))

    rows = [
        _run_stack_loop(model, data, 32),
        _run_processor(
            "dynbatch fixed 32",
            DynamicBatchProcessor(max_batch_size=32, min_batch_size=32),
            model,
            data,
        ),
        _run_processor(
            f"dynbatch dynamic 8..{max_batch_size}",
            DynamicBatchProcessor(max_batch_size=max_batch_size, min_batch_size=8),
            model,
            data,
        ),
    ]
    # The fairest fixed size is the one dynbatch settled on, in a plain loop.
    settled = rows[-1].stats.target_batch_size if rows[-1].stats is not None else 32
    rows.append(_run_stack_loop(model, data, settled))
    echo(_table(rows, baseline=rows[0].samples_per_second))
    echo("")
    for row in rows:
        if row.learned:
            echo(row.learned)
    echo(
        "\nMemory use is the peak as a share of what the device allows: here the host (no "
        "GPU), so the process's peak resident size over the memory it may use, sampled every "
        "20-50 ms by the core's telemetry thread; on a GPU, the device's fullest moment."
    )
    if plot_path is not None:
        from .plots import plot_runs

        plot_runs({row.name: row.stats for row in rows if row.stats is not None}, plot_path)
        echo(f"figure: {plot_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynbatch demo", description=__doc__)
    parser.add_argument("--samples", type=int, default=20000, help="samples to push through")
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--max-batch-size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a small run, for smoke tests")
    parser.add_argument(
        "--plot", metavar="PATH", help="save the runs over time as a figure (needs matplotlib)"
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="the training table instead: the digits MLP with fixed batch 32 and dynamic "
        "batching (needs scikit-learn)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (--train)")
    parser.add_argument(
        "--lr", type=float, default=0.1, help="learning rate tuned for batch 32 (--train)"
    )
    args = parser.parse_args(argv)
    if args.train:
        from .train_demo import run_train_demo

        run_train_demo(2 if args.quick else args.epochs, args.lr, print)
        return
    if args.quick:
        args.samples, args.width = 600, 128
    run_demo(args.samples, args.width, args.max_batch_size, print, args.plot)
