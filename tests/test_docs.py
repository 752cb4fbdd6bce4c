"""The documentation stays true: the quickstart's code runs, the API reference matches the
docstrings, the migration examples run and agree with what they replace, links resolve."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_quickstart_code_runs_in_order(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "quickstart.md").read_text(), re.S)
    assert len(blocks) >= 5
    script = tmp_path / "quickstart.py"
    script.write_text("\n".join(blocks))
    output = run([str(script)], tmp_path).stdout
    assert "dynbatch stats" in output
    assert re.search(r"500 answers, [\d.]+ requests per batch", output)


def test_the_api_reference_matches_the_docstrings() -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("docs/api.md documents dynbatch.ray: needs ray installed")
    result = subprocess.run(
        [sys.executable, str(DOCS / "api_reference.py"), "--check"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("example", "says"),
    [
        ("migrate_dataloader.py", r"same 2000 outputs"),
        ("migrate_torchserve.py", r"200 requests answered as before"),
    ],
)
def test_a_migration_example_runs_and_matches_what_it_replaces(example: str, says: str) -> None:
    assert re.search(says, run([str(ROOT / "examples" / example)], ROOT).stdout)


@pytest.mark.parametrize(
    ("example", "needs", "says"),
    [
        ("migrate_serve_batch.py", "ray.serve", r"128 requests answered as with @serve.batch"),
        ("ray_batch_inference.py", "ray.data", r"10000 rows labelled by 2 actors"),
    ],
)
def test_a_ray_example_runs(example: str, needs: str, says: str) -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec(needs) is None:
        pytest.skip(f"needs {needs}")
    assert re.search(says, run([str(ROOT / "examples" / example)], ROOT, timeout=300).stdout)


def test_relative_links_in_the_docs_resolve() -> None:
    pages = [*DOCS.glob("*.md"), ROOT / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
