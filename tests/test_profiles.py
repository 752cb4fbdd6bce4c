"""ProfileStore: learned sizing state on disk; a controller restored from it starts at the
learned size; bad entries are ignored with one warning; writes are atomic, also under two
writing processes."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from dynbatch import _core
from dynbatch.profiles import FORMAT_VERSION, ProfileStore, default_directory

LAYOUT = "f32[784]"
WHERE = {"device": "cpu", "dtype": "float32"}


def learned_controller() -> _core.SizingController:
    """Settled on a device with latency 157.9 us + 10 us per sample: the knee is 301."""
    controller = _core.SizingController(1, 4096)
    for _ in range(30):
        n = controller.next_batch_size(100_000, 1 << 20, 80 << 30, 80 << 30)
        controller.on_feedback(_core.BatchFeedback(n, compute_ns=157_900 + 10_000 * n))
    assert controller.state()["knee"] == 301
    return controller


def test_a_restored_controller_starts_at_the_learned_size(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    path = store.save("mlp", learned_controller().export_state(), layout=LAYOUT, **WHERE)
    assert path.parent == tmp_path and path.suffix == ".json"
    state = store.load("mlp", layout=LAYOUT, **WHERE)
    assert state is not None
    fresh = _core.SizingController(1, 4096)
    fresh.import_state(state)
    assert not fresh.state()["exploring"]
    sizes = []
    for _ in range(10):
        n = fresh.next_batch_size(100_000, 1 << 20, 80 << 30, 80 << 30)
        sizes.append(n)
        fresh.on_feedback(_core.BatchFeedback(n, compute_ns=157_900 + 10_000 * n))
    assert sizes == [301] * 10  # cold, the same device explores 1, 4, .., 1024 first
    assert store.load("mlp", layout="f32[10]", **WHERE) is None  # another layout: none yet
    assert store.load("other", layout=LAYOUT, **WHERE) is None


def test_a_point_keeps_its_measurements_and_older_points_still_load(tmp_path: Path) -> None:
    """A point stands for up to nine measurements and weighs that much in the line, so a
    profile keeps the count: the restored line is the learned one. A profile written before
    counts were kept ([size, value]) loads as one measurement a point."""
    controller = _core.SizingController(1, 4096)
    for step in range(40):  # noisy times, so the counts shape the line
        n = controller.next_batch_size(100_000, 1 << 20, 80 << 30, 80 << 30)
        noise = (1.0, 1.08, 0.95, 1.03, 0.9)[step % 5]
        controller.on_feedback(
            _core.BatchFeedback(n, compute_ns=int((157_900 + 10_000 * n) * noise))
        )
    store = ProfileStore(tmp_path)
    store.save("noisy", controller.export_state(), layout=LAYOUT, **WHERE)
    state = store.load("noisy", layout=LAYOUT, **WHERE)
    assert state is not None
    counts = [point[2] for point in state["buckets"][0]["latency"]]
    assert max(counts) > 1 and all(isinstance(count, int) for count in counts)
    restored = _core.SizingController(1, 4096)
    restored.import_state(state)
    for key in ("latency_intercept_ns", "latency_slope_ns"):
        assert restored.state()[key] == pytest.approx(controller.state()[key], rel=1e-9)
    older = json.loads(json.dumps(state))
    for bucket in older["buckets"]:
        for line in ("latency", "memory"):
            bucket[line] = [point[:2] for point in bucket[line]]
    store.save("older", older, layout=LAYOUT, **WHERE)
    assert store.load("older", layout=LAYOUT, **WHERE) == older
    _core.SizingController(1, 4096).import_state(older)
    with pytest.raises(ValueError, match="measurements must be a whole number"):
        bad = json.loads(json.dumps(state))
        bad["buckets"][0]["latency"][0][2] = 0.5
        _core.SizingController(1, 4096).import_state(bad)


def test_a_save_leaves_no_garbage_for_the_cycle_collector(tmp_path: Path) -> None:
    """A pass saves its profile when it ends: a save that made reference cycles would leave
    the caller's garbage collector work after every pass."""
    store = ProfileStore(tmp_path)
    state = learned_controller().export_state()
    store.save("job", state, layout=LAYOUT, **WHERE)  # imports and caches warmed
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # nothing collected behind the count below
    try:
        store.save("job", state, layout=LAYOUT, **WHERE)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()


def test_the_default_directory_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(tmp_path / "moved"))
    assert default_directory() == tmp_path / "moved" / "profiles"
    assert ProfileStore().directory == tmp_path / "moved" / "profiles"
    monkeypatch.delenv("DYNBATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "dynbatch" / "profiles"


def _entry(store: ProfileStore) -> tuple[Path, dict[str, Any]]:
    path = store.save("mlp", learned_controller().export_state(), layout=LAYOUT, **WHERE)
    return path, json.loads(path.read_text())


def _with_first_count(entry: dict[str, Any], count: Any) -> dict[str, Any]:
    """The entry with its first latency point's measurement count replaced."""
    spoiled = json.loads(json.dumps(entry))
    spoiled["state"]["buckets"][0]["latency"][0][2] = count
    return spoiled


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda path, entry: path.write_text('{"version": 1, "sta'), "corrupt"),
        (lambda path, entry: path.write_text("[1, 2]"), "not a profile"),
        (
            lambda path, entry: path.write_text(json.dumps({**entry, "version": 99})),
            "format version 99",
        ),
        (
            lambda path, entry: path.write_text(json.dumps({**entry, "device": "cuda:H100"})),
            "learned on device 'cuda:H100', not 'cpu'",
        ),
        (
            lambda path, entry: path.write_text(json.dumps({**entry, "dtype": "bfloat16"})),
            "learned on dtype 'bfloat16'",
        ),
        (
            lambda path, entry: path.write_text(
                json.dumps({**entry, "state": {**entry["state"], "buckets": [{"key": 1}]}})
            ),
            "bad learned state",
        ),
        (
            lambda path, entry: path.write_text(json.dumps(_with_first_count(entry, 1.5))),
            "bad learned state",
        ),
    ],
)
def test_an_unusable_entry_is_ignored_with_one_warning(
    tmp_path: Path, spoil: Any, reason: str
) -> None:
    store = ProfileStore(tmp_path)
    path, entry = _entry(store)
    spoil(path, entry)
    with pytest.warns(RuntimeWarning, match=reason):
        assert store.load("mlp", layout=LAYOUT, **WHERE) is None
    assert store.load("mlp", layout=LAYOUT, **WHERE) is None  # once: no second warning
    # The next save replaces it.
    store.save("mlp", entry["state"], layout=LAYOUT, **WHERE)
    assert store.load("mlp", layout=LAYOUT, **WHERE) == entry["state"]


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        store.load("", layout=LAYOUT, **WHERE)
    with pytest.raises(TypeError, match="device must be"):
        store.load("mlp", layout=LAYOUT, device=None, dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state must be what"):
        store.save("mlp", {"buckets": "no"}, layout=LAYOUT, **WHERE)
    with pytest.raises(ValueError, match="a point must be"):
        _core.SizingController(1, 8).import_state(
            {
                "buckets": [{"key": 0, "latency": [[1.0]], "memory": []}],
                "oom_ceiling": 0,
                "failed_size": 0,
                "longest": 0,
            }
        )


def test_a_failed_write_leaves_the_old_entry_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ProfileStore(tmp_path)
    path, entry = _entry(store)
    before = path.read_bytes()

    def broken(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    changed = {**entry["state"], "oom_ceiling": 7}
    with pytest.raises(OSError, match="disk full"):
        store.save("mlp", changed, layout=LAYOUT, **WHERE)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _writer(directory: str, worker: int, rounds: int) -> None:
    store = ProfileStore(directory)
    state = {"buckets": [], "oom_ceiling": 0, "failed_size": 0, "longest": 0}
    for round_ in range(rounds):
        shared = {**state, "oom_ceiling": worker * 1000 + round_ + 1}
        store.save("shared", shared, layout=LAYOUT, **WHERE)
        store.save(f"own-{worker}", {**state, "longest": round_ + 1}, layout=LAYOUT, **WHERE)


def test_two_processes_writing_at_once_lose_nothing_but_their_own_last_writes(
    tmp_path: Path,
) -> None:
    rounds = 200
    context = multiprocessing.get_context("fork")  # the writers use no torch: fork is safe
    workers = [context.Process(target=_writer, args=(str(tmp_path), w, rounds)) for w in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    store = ProfileStore(tmp_path)
    for worker in (1, 2):  # each process's own entry holds its last write
        own = store.load(f"own-{worker}", layout=LAYOUT, **WHERE)
        assert own is not None and own["longest"] == rounds
    shared = store.load("shared", layout=LAYOUT, **WHERE)  # one of the two last writes, whole
    assert shared is not None and shared["oom_ceiling"] in (1000 + rounds, 2000 + rounds)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert all(json.loads(p.read_text())["version"] == FORMAT_VERSION for p in tmp_path.iterdir())
