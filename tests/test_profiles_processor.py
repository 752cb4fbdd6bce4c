"""The sizing profile through the processor: a second run of the same job starts at the learned
size; profile=False touches no file; bad entries and unwritable folders warn once and never
raise; two processes saving at once; the same learned state in state_dict()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import dynbatch as ds
from dynbatch.profiles import ProfileBinding, ProfileStore, model_identity

from .simulated_device import SimulatedDevice, SimulatedOOM, tagged_samples

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 6000
LAYOUT = "stack .:float32[3]"  # tagged_samples' layout, as the engine writes it


def device() -> SimulatedDevice:
    """latency 2 ms + 0.1 ms per sample: the knee (5% tolerance) is 380."""
    return SimulatedDevice(a_s=0.002, b_s=0.0001, m0=1 << 20, m1=1 << 16, capacity=1 << 34)


def simulated_processor(
    sim: SimulatedDevice, profile: Any, **options: Any
) -> ds.DynamicBatchProcessor:
    """A processor on ``sim`` (its clock, telemetry, memory and out-of-memory errors)."""
    return ds.DynamicBatchProcessor(
        oom_errors=(SimulatedOOM,),
        telemetry=sim.telemetry,
        clock=sim.clock,
        memory_monitor=sim,
        profile=profile,
        **options,
    )


def simulated_pass(profile: Any, **options: Any) -> tuple[list[int], int, ds.DynamicBatchProcessor]:
    """One map pass on a fresh simulated device: (batch sizes, settled target, the processor,
    closed)."""
    sim = device()
    with simulated_processor(sim, profile, **options) as processor:
        processor.map(sim.model, tagged_samples(SAMPLES))
        target = processor.stats().target_batch_size
    return [len(run) for run in sim.runs], target, processor


def cache() -> Path:
    return Path(os.environ["DYNBATCH_CACHE_DIR"]) / "profiles"


def test_a_second_run_starts_at_the_learned_size() -> None:
    cold, learned, _ = simulated_pass("sim-job")
    assert cold[0] < learned  # cold: it explores up from a small rung
    assert [p.name for p in cache().iterdir()] == [ProfileStore().path("sim-job", LAYOUT).name]
    warm, _, _ = simulated_pass("sim-job")
    assert warm[:8] == [learned] * 8  # every batch at the learned size from the first
    assert max(set(warm), key=warm.count) == learned  # and it stays there (verifying aside)
    # Another name, or none: a cold start again.
    assert simulated_pass("other-job")[0][0] == cold[0]
    assert simulated_pass(False)[0][0] == cold[0]


def test_profile_false_touches_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the profile store was used")

    monkeypatch.setattr(ProfileStore, "load", refuse)
    monkeypatch.setattr(ProfileStore, "save", refuse)
    model = torch.nn.Linear(8, 2)
    with ds.DynamicBatchProcessor(profile=False) as processor, torch.inference_mode():
        processor.map(model, [torch.randn(8) for _ in range(3000)])
    assert not cache().exists()
    # An injected clock (a simulation) has no automatic profile either.
    simulated_pass(None)
    assert not cache().exists()


def run_cpu_job(model: torch.nn.Module, count: int = 8000) -> tuple[bool, str | None]:
    """A default processor over ``model`` (the automatic profile): (whether the sizing was
    exploring at the first batch, the profile's name). One creation site for every call."""
    data = [torch.randn(16) for _ in range(count)]
    sizes: list[int] = []
    exploring: list[bool] = []
    with (
        ds.DynamicBatchProcessor(
            telemetry=ds._core.Telemetry.scripted(1 << 36, 1 << 36, period_s=3600.0)
        ) as processor,
        torch.inference_mode(),
    ):
        for batch in processor(data):
            if not sizes:
                exploring.append(bool(processor._engine.policy.state()["exploring"]))
            model(batch)
            sizes.append(len(batch))
        assert processor._engine.profile is not None
        name = processor._engine.profile.name
    return exploring[0], name


def test_the_automatic_profile_is_per_creation_site_and_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    cold_exploring, name = run_cpu_job(model)
    assert cold_exploring
    assert name is not None and name.startswith("auto-test_profiles_processor-")
    entries = list(cache().iterdir())
    assert len(entries) == 1
    saved = json.loads(entries[0].read_text())
    assert saved["device"] == "scripted" and saved["dtype"] == "float32"
    assert saved["layout"] == "stack .:float32[16]"
    warm_exploring, again = run_cpu_job(model)
    assert again == name
    assert not warm_exploring  # it starts at the learned size and only verifies it
    # The iterator knows no model: the site names the job. map() and serving add the model's
    # architecture (not its weights), so one helper running two models keeps two profiles.
    assert model_identity(torch.nn.Linear(4, 8)) == model_identity(torch.nn.Linear(4, 8))
    assert model_identity(torch.nn.Linear(4, 8)) != model_identity(torch.nn.Linear(4, 16))
    assert model_identity(torch.nn.Linear(4, 8).half()) != model_identity(torch.nn.Linear(4, 8))
    linear = torch.nn.Linear(4, 8)
    assert "Linear" in model_identity(lambda x: linear(x))  # a closure over a module
    assert "Linear" in model_identity(linear.forward)


def test_the_model_names_the_automatic_profile() -> None:
    names = []
    for width in (8, 8, 16):
        model = torch.nn.Linear(4, width)
        with ds.DynamicBatchProcessor() as processor, torch.inference_mode():
            processor.map(model, [torch.randn(4) for _ in range(50)])
            assert processor._engine.profile is not None
            names.append(processor._engine.profile.name)
    assert names[0] == names[1] != names[2]


def test_a_corrupt_entry_warns_once_and_the_run_learns_afresh() -> None:
    cold, learned, _ = simulated_pass("sim-job")
    path = ProfileStore().path("sim-job", LAYOUT)
    path.write_text('{"version": 1, "state": {"buck')
    with pytest.warns(RuntimeWarning, match="corrupt") as caught:
        sizes, target, _ = simulated_pass("sim-job")
    assert len(caught) == 1
    assert sizes[:3] == cold[:3] and target == learned  # explored again, to the same size
    assert json.loads(path.read_text())["state"]["buckets"]  # and the entry is whole again
    assert simulated_pass("sim-job")[0][0] == learned


def test_an_entry_from_another_device_is_ignored() -> None:
    simulated_pass("sim-job")
    path = ProfileStore().path("sim-job", LAYOUT)
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "device": "cuda:NVIDIA H100 80GB HBM3"}))
    with pytest.warns(RuntimeWarning, match="learned on device"):
        sizes, _, _ = simulated_pass("sim-job")
    assert sizes[0] < sizes[-2]  # a cold start


def test_an_unwritable_cache_warns_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def read_only(*args: Any, **kwargs: Any) -> Any:  # what a read-only folder answers
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.warns(RuntimeWarning, match="cannot be saved") as caught:
        for _ in range(3):
            sizes, learned, _ = simulated_pass("sim-job")
    assert len(caught) == 1
    assert sizes[0] < learned  # nothing saved: each run is cold


def test_bad_profile_arguments_name_it() -> None:
    for value, error, message in (
        (1, TypeError, "profile must be None, a name"),
        (Path("x"), TypeError, "profile must be None, a name"),
        (True, ValueError, "profile=True is not a choice"),
        ("", ValueError, "profile must be a non-empty name"),
        ("a\0b", ValueError, "profile must be a non-empty name"),
    ):
        with pytest.raises(error, match=message):
            ds.DynamicBatchProcessor(profile=value)


def test_state_dict_carries_the_learned_sizing() -> None:
    _, learned, first = simulated_pass(False)
    state = first.state_dict()
    assert state["version"] == 2 and state["sizing"]["device"] == "scripted"
    json.dumps(state["sizing"])  # plain data, as a checkpoint keeps it
    sim = device()
    restored = simulated_processor(sim, False)
    with restored:
        restored.load_state_dict(state)
        assert restored.state_dict()["sizing"] == state["sizing"]
        restored.map(sim.model, tagged_samples(SAMPLES))
    assert [len(run) for run in sim.runs[:8]] == [learned] * 8


def test_a_loaded_state_dict_wins_over_the_profile() -> None:
    _, learned, first = simulated_pass("sim-job")
    state = first.state_dict()
    path = ProfileStore().path("sim-job", LAYOUT)
    entry = json.loads(path.read_text())
    entry["state"]["buckets"][0]["latency"] = [[8.0, 1e6], [64.0, 2e6], [512.0, 9e9]]
    path.write_text(json.dumps(entry))  # a profile that would say "small"
    sim = device()
    with simulated_processor(sim, "sim-job") as processor:
        processor.load_state_dict(state)
        processor.map(sim.model, tagged_samples(1000))
    assert len(sim.runs[0]) == learned


def test_load_state_dict_checks_the_sizing() -> None:
    _, _, first = simulated_pass(False)
    state = first.state_dict()
    with ds.DynamicBatchProcessor(profile=False) as processor:
        with pytest.raises(ValueError, match=r"state\['sizing'\] must be"):
            processor.load_state_dict({**state, "sizing": {"device": "cpu", "learned": 3}})
        with pytest.raises(ValueError, match="expects what"):
            processor.load_state_dict({"version": 2, "training": state["training"]})
        with pytest.warns(RuntimeWarning, match="learned on 'scripted'"):
            processor.load_state_dict(state)  # this processor's device is the host: ignored
        processor.load_state_dict({"version": 1, "training": state["training"]})


def test_saves_are_throttled_and_a_periodic_one_comes_due(tmp_path: Path) -> None:
    binding = ProfileBinding("job", device="cpu", store=ProfileStore(tmp_path), interval_s=3600)
    empty: dict[str, Any] = {"buckets": [], "oom_ceiling": 0, "failed_size": 0, "longest": 0}
    assert not binding.save(empty)  # not bound to a layout yet
    assert binding.bind("f32[4]", "float32") is None
    assert binding.bind("f32[8]", "float32") is None and binding.layout == "f32[4]"
    assert not binding.due()
    assert binding.save({**empty, "oom_ceiling": 5})  # the first write goes at once
    assert not binding.save({**empty, "oom_ceiling": 6})  # within the interval: later
    assert binding.save({**empty, "oom_ceiling": 6}, force=True)  # a close
    assert not binding.save({**empty, "oom_ceiling": 6}, force=True)  # unchanged: no write
    assert ProfileStore(tmp_path).load("job", layout="f32[4]", device="cpu", dtype="float32") == {
        **empty,
        "oom_ceiling": 6,
    }
    often = ProfileBinding("job", device="cpu", store=ProfileStore(tmp_path), interval_s=0)
    often.bind("f32[4]", "float32")
    assert often.due() and often.due()


def test_a_long_pass_saves_before_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ProfileBinding, "due", lambda self: self.layout is not None)
    sim = device()
    with simulated_processor(sim, "sim-job") as processor:
        seen = []
        for batch in processor(tagged_samples(SAMPLES)):
            sim.model(batch)
            seen.append(ProfileStore().path("sim-job", LAYOUT).exists())
    assert seen[-1] and not seen[0]  # written mid-pass once settled, not while exploring


_WRITER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import dynbatch as ds
    from simulated_device import SimulatedDevice, SimulatedOOM, tagged_samples

    a_s = float(sys.argv[1])
    finals = {{}}
    for name in ("shared", "own-" + sys.argv[1]):
        for _ in range(4):
            sim = SimulatedDevice(a_s=a_s, b_s=0.0001, m0=1 << 20, m1=1 << 16, capacity=1 << 34)
            with ds.DynamicBatchProcessor(
                oom_errors=(SimulatedOOM,), telemetry=sim.telemetry, clock=sim.clock,
                memory_monitor=sim, profile=name,
            ) as processor:
                processor.map(sim.model, tagged_samples(3000))
                finals[name] = processor.state_dict()["sizing"]["learned"]
    print(json.dumps(finals))
    """
)


def test_two_processes_saving_at_once_lose_nothing_but_their_own_last_write() -> None:
    script = _WRITER.format(tests=str(ROOT / "tests"))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, a_s],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a_s in ("0.002", "0.004")
    ]
    finals = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        finals.append(json.loads(out))
    store = ProfileStore()
    where = {"layout": LAYOUT, "device": "scripted", "dtype": "float32"}
    shared = store.load("shared", **where)
    assert shared is not None and shared in (finals[0]["shared"], finals[1]["shared"])
    # The two devices learn differently (their own entries); the shared entries' finals may
    # agree (a short pass's points need not move the medians of what it loaded).
    assert finals[0]["own-0.002"] != finals[1]["own-0.004"]
    for a_s, final in zip(("0.002", "0.004"), finals, strict=True):
        assert store.load(f"own-{a_s}", **where) == final[f"own-{a_s}"]
    assert not [p for p in cache().iterdir() if p.suffix == ".tmp"]


def test_an_odd_model_still_names_the_automatic_profile(tmp_path: Path) -> None:
    class Odd:
        @property
        def named_parameters(self) -> Any:
            raise RuntimeError("not here")

    binding = ProfileBinding(None, device="cpu", site="/job.py:main", store=ProfileStore(tmp_path))
    binding.note_model(Odd())  # never raises into map()/fit()
    assert binding.bind("f32[4]", "float32") is None
    assert binding.name is not None and binding.name.startswith("auto-job-")
