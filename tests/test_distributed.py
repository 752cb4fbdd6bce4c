"""dynbatch.distributed: shard and gather in one process, and on 2 gloo ranks under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dynbatch as ds
from dynbatch.distributed import _bounds, _check_counts, gather, shard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_inference.py"

# 7 rows over 2 ranks (4 and 3); "drop" makes rank 1 lose one output. The barrier after gather
# shows that no rank is left waiting when rank 0 raises. Then a group holding only rank 1.
WORKER = """
import sys

import torch
import torch.distributed as dist

from dynbatch.distributed import gather, shard

dist.init_process_group("gloo")
rank = dist.get_rank()
part = shard(torch.arange(7) * 10)
print(f"rank {rank} shard {[int(row) for row in part]}")
outputs = [{"row": row} for row in part]
if sys.argv[1] == "drop" and rank == 1:
    outputs = outputs[:-1]
try:
    gathered = gather(outputs)
except ValueError as error:
    print(f"rank {rank} ValueError: {error}")
else:
    if gathered is None:
        print(f"rank {rank} got None")
    else:
        print(f"rank {rank} gathered {[int(output['row']) for output in gathered]}")
        own = all(output["row"].untyped_storage().nbytes() == 8 for output in gathered)
        print(f"rank {rank} tensors own their storage: {own}")
dist.barrier()

only_rank_1 = dist.new_group([1])
if rank == 1:
    letters = gather(list(shard("abc", group=only_rank_1)), group=only_rank_1)
    print(f"rank 1 in its group: {letters}")
else:
    try:
        shard("abc", group=only_rank_1)
    except ValueError as error:
        print(f"rank 0 outside the group: {error}")
dist.destroy_process_group()
"""


def _run_two_ranks(script: Path, *args: str) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of ``script`` on 2 CPU ranks under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [*command, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as launch:
        try:
            output, _ = launch.communicate(timeout=80)
        except subprocess.TimeoutExpired:
            launch.terminate()  # torchrun passes it on to the ranks (in sessions of their own)
            output, _ = launch.communicate(timeout=30)
            pytest.fail(f"the 2-rank run hung:\n{output}")
    return launch.returncode, output


def test_example_runs_on_two_ranks() -> None:
    code, output = _run_two_ranks(EXAMPLE)
    assert code == 0, output
    assert "rank 0: 1000 outputs in input order, world size 2" in output
    assert "rank 0: 500 samples" in output and "rank 1: 500 samples" in output


def test_example_runs_without_torchrun() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "rank 0: 1000 samples" in result.stdout
    assert "rank 0: 1000 outputs in input order, world size 1" in result.stdout


def test_uneven_split_gathers_in_input_order(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    code, output = _run_two_ranks(script, "keep")
    assert code == 0, output
    assert "rank 0 shard [0, 10, 20, 30]" in output and "rank 1 shard [40, 50, 60]" in output
    assert "rank 0 gathered [0, 10, 20, 30, 40, 50, 60]" in output
    assert "rank 0 tensors own their storage: True" in output
    assert "rank 1 got None" in output
    assert "rank 1 in its group: ['a', 'b', 'c']" in output
    assert "rank 0 outside the group: this process is not a member" in output


def test_a_rank_dropping_an_output_is_named_on_rank_0(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    code, output = _run_two_ranks(script, "drop")
    assert code == 0, output
    assert "rank 0 ValueError: " in output and "rank 1 returned 2, expected 3" in output
    assert "rank 0 returned" not in output
    assert "rank 1 got None" in output


def test_without_process_group_shard_is_a_lazy_view_of_everything() -> None:
    assert not dist.is_initialized()
    data = list(range(5))
    view = shard(data)
    assert isinstance(view, Sequence) and len(view) == 5
    assert (view[0], view[-1], view[-5]) == (0, 4, 0)
    assert view[1:4] == [1, 2, 3] and view[::-2] == [4, 2, 0]
    assert list(view) == data and 3 in view and view.index(3) == 3
    for outside in (5, -6):
        with pytest.raises(IndexError):
            view[outside]
    data[2] = 99
    assert view[2] == 99  # a view, not a copy

    rows = torch.arange(12.0).reshape(6, 2)
    assert shard(rows)[1].data_ptr() == rows[1].data_ptr()


def test_shard_reads_a_dataset_only_when_indexed() -> None:
    reads: list[int] = []

    class Squares(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> int:
            reads.append(index)
            return index * index

    view = shard(Squares())
    assert len(view) == 10 and reads == []
    assert view[-2] == 64 and reads == [8]


def test_processor_takes_a_shard() -> None:
    samples = torch.arange(10.0).unsqueeze(1)
    processor = ds.DynamicBatchProcessor(max_batch_size=4)
    assert sum(len(batch) for batch in processor(shard(samples))) == 10
    outputs = processor.map(lambda batch: batch * 2, shard(samples))
    assert torch.equal(torch.stack(outputs), samples * 2)
    processor.close()


def test_without_process_group_gather_returns_the_outputs() -> None:
    assert gather(iter([1, {"a": 2}])) == [1, {"a": 2}]
    with pytest.raises(ValueError, match=r"dst must be a rank in 0\.\.0, got 1"):
        gather([1], dst=1)


@pytest.mark.parametrize(
    "inputs", [(n for n in range(3)), {1, 2}, {"a": 1}], ids=["generator", "set", "dict"]
)
def test_shard_rejects_inputs_without_positions(inputs: object) -> None:
    with pytest.raises(TypeError, match=r"shard\(inputs\) needs"):
        shard(inputs)  # type: ignore[arg-type]


def test_split_is_contiguous_and_balanced() -> None:
    for length in range(30):
        for world in range(1, 7):
            spans = [_bounds(length, rank, world) for rank in range(world)]
            assert [i for start, stop in spans for i in range(start, stop)] == list(range(length))
            sizes = [stop - start for start, stop in spans]
            larger = length % world
            assert sizes == [length // world + 1] * larger + [length // world] * (world - larger)


def test_count_check_blames_only_the_ranks_that_are_off() -> None:
    for valid in ([4, 3], [3, 3], [0, 0, 0], [1, 0, 0], [10] * 8):
        _check_counts(valid)
    cases = {
        (4, 2): "rank 1 returned 2, expected 3",
        (3, 4): "rank 0 returned 3, expected 4",
        (10, 10, 10, 10, 10, 9, 10, 10): "rank 5 returned 9, expected 10",
        (5, 5, 0, 5): "rank 2 returned 0, expected 5",
    }
    for counts, blame in cases.items():
        with pytest.raises(ValueError) as raised:
            _check_counts(counts)
        assert blame in str(raised.value) and str(raised.value).count("returned") == 1
