"""dynbatch.ray on a local Ray instance: Predictor in Ray Data actors, the Serve deployment."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from dynbatch.ray import Predictor, deployment  # noqa: E402  (after the skip)

# Ray's own deprecations, not this code's: DataContext sets its deprecated options when it is
# built or copied, and Serve's config models use pydantic v1 idioms.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:`{option}` is deprecated:DeprecationWarning")
    for option in ("use_push_based_shuffle", "use_polars", "use_arrow_tensor_v2")
] + [
    pytest.mark.filterwarnings(
        "ignore:Using extra keyword arguments on `Field` is deprecated:DeprecationWarning"
    )
]

ROWS = 2000
WIDTH = 8
OOM_LIMIT = 32  # the simulated device fits batches up to this size


class SimulatedOOM(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError (module level: Ray pickles it by name)."""


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every actor builds the same weights
    return torch.nn.Linear(WIDTH, 3).eval()


def small_device_model() -> Any:
    """Doubles its input; runs out of memory on batches above OOM_LIMIT. Each row's output
    is (2 * its first value, the size of the batch that answered it)."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > OOM_LIMIT:
            raise SimulatedOOM(f"a batch of {len(batch)} does not fit")
        return torch.stack([2 * batch[:, 0], torch.full((len(batch),), float(len(batch)))], 1)

    return run


def masked_sum_model() -> Any:
    """Sums each padded row over its real positions only."""
    return lambda batch: (batch.data * batch.mask).sum(1)


def features(row_id: int) -> np.ndarray:
    return np.arange(WIDTH, dtype=np.float32) + row_id


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def rows_by_id(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The rows keyed by id, failing on a missing or repeated one."""
    by_id = {int(row["id"]): row for row in rows}
    assert len(rows) == ROWS, f"{len(rows)} rows came back for {ROWS}"
    assert sorted(by_id) == list(range(ROWS)), "some ids are missing or repeated"
    return by_id


def test_every_row_comes_back_once_with_the_models_output(local_ray: None) -> None:
    dataset = ray.data.from_items([{"id": i, "x": features(i)} for i in range(ROWS)])
    predicted = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            model_factory=linear_model, input_column="x", output_column="y", max_batch_size=64
        ),
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=250,
    )
    by_id = rows_by_id(predicted.take_all())
    with torch.no_grad():
        expected = linear_model()(torch.from_numpy(np.stack([features(i) for i in range(ROWS)])))
    for row_id, row in by_id.items():
        np.testing.assert_array_equal(row["x"], features(row_id))  # input columns kept
        np.testing.assert_allclose(row["y"], expected[row_id].numpy(), rtol=1e-5, atol=1e-6)


def oom_run(**processor_options: Any) -> Any:
    dataset = ray.data.from_items([{"id": i, "x": features(i)} for i in range(ROWS)])
    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            model_factory=small_device_model,
            input_column="x",
            # Every first batch of a block is too big for the device: it must be split.
            min_batch_size=2 * OOM_LIMIT,
            max_batch_size=4 * OOM_LIMIT,
            **processor_options,
        ),
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=500,
    )


def test_out_of_memory_batches_are_split_inside_the_actor(local_ray: None) -> None:
    by_id = rows_by_id(oom_run(oom_errors=(SimulatedOOM,)).take_all())
    for row_id, row in by_id.items():
        doubled, answered_by = row["output"]
        assert doubled == 2 * row_id
        assert 1 <= answered_by <= OOM_LIMIT


def test_an_unlisted_out_of_memory_error_fails_the_job(local_ray: None) -> None:
    with pytest.raises(ray.exceptions.RayError, match="does not fit"):
        oom_run().take_all()


def test_ragged_rows_are_padded(local_ray: None) -> None:
    lengths = [1 + i % 7 for i in range(ROWS)]
    dataset = ray.data.from_items(
        [{"id": i, "tokens": np.arange(n, dtype=np.float32)} for i, n in enumerate(lengths)]
    )
    predicted = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            model_factory=masked_sum_model, input_column="tokens", collate="pad", pad_value=-1
        ),
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=400,
    )
    for row_id, row in rows_by_id(predicted.take_all()).items():
        length = lengths[row_id]
        assert row["output"] == length * (length - 1) / 2


def test_predictor_keeps_columns_and_order_without_ray_data() -> None:
    predictor = Predictor(linear_model, max_batch_size=16)
    try:
        data = np.stack([features(i) for i in range(100)])
        batch = {"data": data, "name": np.array([f"row{i}" for i in range(100)])}
        result = predictor(batch)
        assert list(result) == ["data", "name", "output"]
        assert result["name"] is batch["name"]
        with torch.no_grad():
            expected = linear_model()(torch.from_numpy(data)).numpy()
        np.testing.assert_allclose(result["output"], expected, rtol=1e-5, atol=1e-6)
        assert predictor.processor.stats().samples == 100
    finally:
        predictor.close()


def bfloat16_model() -> Any:
    return lambda batch: (batch * 2).to(torch.bfloat16)


def test_outputs_in_dtypes_numpy_lacks_come_back_as_float32() -> None:
    predictor = Predictor(bfloat16_model, max_batch_size=8)
    try:
        result = predictor({"data": np.ones((10, 4), dtype=np.float32)})
        assert result["output"].dtype == np.float32
        np.testing.assert_array_equal(result["output"], np.full((10, 4), 2.0))
    finally:
        predictor.close()


def test_replica_replies_own_their_rows_namedtuples_included() -> None:
    from collections import namedtuple

    from dynbatch.ray import _owned

    Out = namedtuple("Out", ["scores", "label"])
    batch = torch.arange(12.0).reshape(4, 3)
    reply = _owned({"out": Out(batch[1], batch[2, 0]), "rows": [batch[3]]})
    assert isinstance(reply["out"], Out)
    assert torch.equal(reply["out"].scores, batch[1])
    assert reply["out"].scores.untyped_storage().nbytes() == 3 * 4  # its own row, not the batch
    assert reply["rows"][0].untyped_storage().nbytes() == 3 * 4


def test_outputs_of_different_shapes_become_an_object_column() -> None:
    rows = np.empty(3, dtype=object)
    for i, length in enumerate((2, 5, 3)):
        rows[i] = np.ones(length, dtype=np.float32)
    # A batch per row: each padded output keeps its own row's length.
    predictor = Predictor(lambda: lambda batch: batch.data, collate="pad", max_batch_size=1)
    try:
        output = predictor({"data": rows})["output"]
    finally:
        predictor.close()
    assert output.dtype == object
    assert [row.shape for row in output] == [(2,), (5,), (3,)]


def test_a_missing_column_is_named() -> None:
    predictor = Predictor(linear_model, input_column="pixels")
    try:
        with pytest.raises(KeyError, match=r"'pixels' is not in the batch.*\['data', 'id'\]"):
            predictor({"id": np.arange(3), "data": np.zeros((3, WIDTH), np.float32)})
        with pytest.raises(TypeError, match="column 'pixels' has dtype <U1"):
            predictor({"pixels": np.array(["a", "b"])})
    finally:
        predictor.close()


def test_bad_options_fail_before_the_model_is_built() -> None:
    def must_not_run() -> Any:
        raise AssertionError("the model was built")

    with pytest.raises(TypeError, match="invalid DynamicBatchProcessor option"):
        Predictor(must_not_run, max_batch_sise=8)
    with pytest.raises(TypeError, match="model_factory"):
        Predictor(must_not_run, model=linear_model())
    with pytest.raises(TypeError, match="invalid DynamicBatchProcessor option"):
        deployment(must_not_run, processor_options=dict(max_delay=5))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_replica_batches_concurrent_requests(local_ray: None) -> None:
    serve = pytest.importorskip("ray.serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = deployment(
            linear_model,
            name="linear",
            processor_options=dict(max_batch_size=64, max_delay_ms=20),
        ).bind()
        handle = serve.run(app, name="dynbatch_test", route_prefix="/linear")
        samples = [torch.from_numpy(features(i)) for i in range(64)]
        responses = [handle.remote(sample) for sample in samples]
        outputs = [response.result(timeout_s=60) for response in responses]
        with torch.no_grad():
            expected = linear_model()(torch.stack(samples))
        torch.testing.assert_close(torch.stack(outputs), expected)
        # Each row was cloned out of its batch, so it travels alone.
        assert all(output.untyped_storage().nbytes() == 3 * 4 for output in outputs)

        body = json.dumps(features(7).tolist()).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/linear", data=body)
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
        torch.testing.assert_close(torch.tensor(answer), expected[7])

        stats = handle.stats.remote().result(timeout_s=60)
        assert stats.samples == 65
        assert stats.mean_batch_size > 1
        # Serve's default max_ongoing_requests (5) would have capped every batch at 5.
        assert max(stats.histogram) > 5
    finally:
        serve.shutdown()


def test_importing_dynbatch_does_not_import_ray() -> None:
    code = "import sys, dynbatch; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_ray_the_import_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an environment without Ray sees
        "try:\n    import dynbatch.ray\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert 'pip install "dynbatch[ray]"' in result.stdout
