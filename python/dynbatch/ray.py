"""Scale-out on Ray: dynamic batches inside Ray Data actors and Ray Serve replicas.

Batch inference with Ray Data: each actor builds the model once and re-batches every block it
receives adaptively (splitting and retrying batches that run out of memory)::

    import ray
    from dynbatch.ray import Predictor

    predictions = ray.data.read_parquet(...).map_batches(
        Predictor,
        fn_constructor_kwargs=dict(
            model_factory=load_model, input_column="image", output_column="label",
            max_batch_size=256,  # any other option goes to DynamicBatchProcessor
        ),
        compute=ray.data.ActorPoolStrategy(size=4),  # or concurrency=4 (deprecated in Ray 2.51)
        batch_size=4096,  # rows per call: dynbatch forms the model's batches inside it
    )

Online serving with Ray Serve: ``deployment`` replaces ``@serve.batch`` (see its docstring).
Needs Ray (``pip install "dynbatch[ray]"``); ``import dynbatch`` alone never imports it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .processor import DynamicBatchProcessor
from .stats import Stats

try:
    import ray  # noqa: F401  (fail at import, not halfway through a cluster job)
except ImportError:
    raise ImportError('dynbatch.ray needs Ray: pip install "dynbatch[ray]"') from None

if TYPE_CHECKING:
    from ray.serve import Deployment

__all__ = ["Predictor", "deployment"]

ModelFactory = Callable[[], Callable[[Any], Any]]


def _check_processor_options(options: Mapping[str, Any]) -> None:
    """Rejects a misspelled option where it is written, not later in a remote actor."""
    if "model" in options:
        raise TypeError("pass the model as model_factory, not as a processor option")
    try:
        inspect.signature(DynamicBatchProcessor).bind(**options)
    except TypeError as error:
        raise TypeError(f"invalid DynamicBatchProcessor option: {error}") from None


def _build_model(model_factory: ModelFactory) -> Callable[[Any], Any]:
    model = model_factory()
    if not callable(model):
        raise TypeError(f"model_factory() must return a callable, got {type(model).__name__}")

    def run(batch: Any) -> Any:
        # Per call, not per process: inference mode is thread-local, and serving runs the
        # model on the processor's worker thread.
        with torch.inference_mode():
            return model(batch)

    return run


def _rows(column: np.ndarray, name: str) -> list[Any]:
    """The column's rows as numpy arrays, not copied: dynbatch collates straight from them,
    read-only ones included (Ray's zero-copy batches, which torch.from_numpy warns about)."""
    if column.dtype == object:  # Ray's variable-shaped tensor column: one array per row
        for index, row in enumerate(column):
            if not isinstance(row, np.ndarray):
                raise TypeError(
                    f"column {name!r} holds a {type(row).__name__} at row {index}; "
                    "Predictor needs numeric arrays or numbers"
                )
    elif column.dtype.kind not in "biufc":
        raise TypeError(f"column {name!r} has dtype {column.dtype}, which cannot be batched")
    return list(column)


def _to_column(results: list[Any], name: str) -> np.ndarray:
    """One array when every row's output has the same shape, else an object array of rows."""
    for result in results:
        if not isinstance(result, torch.Tensor):
            raise TypeError(
                f"the model's output for column {name!r} must be a tensor, "
                f"got {type(result).__name__} per row"
            )
    if results and len({result.shape for result in results}) == 1:
        return _numpy(torch.stack(results))
    column = np.empty(len(results), dtype=object)
    for index, result in enumerate(results):  # item by item: numpy would broadcast a list
        column[index] = _numpy(result)
    return column


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """On the CPU as numpy; dtypes numpy lacks (bfloat16, float8...) as float32."""
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.float().numpy()


class Predictor:
    """A callable class for ``Dataset.map_batches``: one model and one processor per actor.

    Ray Data constructs it once per actor with ``fn_constructor_kwargs`` and calls it on
    numpy batches (the default ``batch_format``). Each call batches the rows of
    ``input_column`` with ``processor.map``, so the model sees batches sized by what dynbatch
    has learned in this actor (split in halves on out-of-memory errors, every row still
    answered exactly once), and returns the batch with ``output_column`` added (or replaced);
    every other column and the row order are kept.

    Rows may be fixed-shape (one array column) or ragged (Ray's variable-shaped tensor
    column, with ``collate="pad"``). The model gets torch batches on the CPU (moving them to
    a GPU is the model's job) and must return a tensor with one row per sample; outputs of
    one shape become one array column, others an object column of arrays.

    Args:
        model_factory: builds the model (a callable taking a batch), once per actor. It must
            be picklable: a module-level function or class, not a lambda in ``__main__``
            when the actors run elsewhere.
        input_column: the column holding the model's input (default ``"data"``, the column
            of ``ray.data.range_tensor`` and ``from_numpy``).
        output_column: where the model's output goes (default ``"output"``).
        **processor_options: ``DynamicBatchProcessor`` options (``max_batch_size``,
            ``collate``, ``oom_errors``...); ``model`` is not one of them.

    Calls must not overlap (Ray Data's default of one call at a time per actor): the calls
    share the processor. ``processor`` and ``model`` are attributes; ``processor.stats()``
    says how this actor batched (in ``map_batches`` the actors are Ray's, so this is for
    direct use and tests).
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        *,
        input_column: str = "data",
        output_column: str = "output",
        **processor_options: Any,
    ) -> None:
        if not callable(model_factory):
            raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
        for argument, value in (("input_column", input_column), ("output_column", output_column)):
            if not isinstance(value, str):
                raise TypeError(f"{argument} must be a str, got {type(value).__name__}")
        _check_processor_options(processor_options)
        self.input_column = input_column
        self.output_column = output_column
        # Options first: a bad one fails before a possibly slow model load.
        self.processor = DynamicBatchProcessor(**processor_options)
        self.model = _build_model(model_factory)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch with ``output_column`` added: the model's output for every row of
        ``input_column``, computed in batches that dynbatch sizes."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Predictor takes numpy batches (a dict of column arrays), got "
                f"{type(batch).__name__}: leave map_batches' batch_format at its default"
            )
        if self.input_column not in batch:
            raise KeyError(
                f"input column {self.input_column!r} is not in the batch; "
                f"its columns are {sorted(batch)}"
            )
        rows = _rows(batch[self.input_column], self.input_column)
        results = self.processor.map(self.model, rows)
        return {**batch, self.output_column: _to_column(results, self.output_column)}

    def close(self) -> None:
        """Stops the processor's threads. Ray calls ``__del__`` when the actor retires."""
        self.processor.close()

    def __del__(self) -> None:
        if "processor" in self.__dict__:  # __init__ may have failed before creating it
            self.close()


def _json_body_to_tensor(body: bytes) -> torch.Tensor:
    """The default ``decode``: a JSON array (nested for more dimensions) as a tensor."""
    return torch.tensor(json.loads(body))


def _to_json(output: Any) -> Any:
    """The default ``encode``: tensors as (nested) lists, in dicts, tuples and lists alike."""
    if isinstance(output, torch.Tensor):
        return output.tolist()
    if isinstance(output, Mapping):
        return {key: _to_json(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return [_to_json(value) for value in output]
    return output


def _owned(output: Any) -> Any:
    """A row's own copy: the row is a view, and pickling a view sends the whole batch."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, Mapping):
        return {key: _owned(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        items = [_owned(value) for value in output]
        if hasattr(output, "_fields"):  # a namedtuple takes its fields as arguments
            return type(output)(*items)
        return type(output)(items)
    return output


@dataclass(frozen=True)
class _ServeSettings:
    model_factory: ModelFactory
    processor_options: Mapping[str, Any]
    decode: Callable[[bytes], Any]
    encode: Callable[[Any], Any]


class _Replica:
    """A Serve replica: the model, built once, behind one DynamicBatchProcessor.
    ``deployment`` subclasses it with its settings, so ``.bind()`` needs no arguments."""

    settings: ClassVar[_ServeSettings]

    def __init__(self) -> None:
        from starlette.requests import Request  # Serve's HTTP request type

        self._http_request = Request
        model = _build_model(self.settings.model_factory)
        self.processor = DynamicBatchProcessor(model=model, **self.settings.processor_options)

    async def __call__(self, request: Any) -> Any:
        """HTTP: the body through ``decode``, the result through ``encode``. Handle calls
        (``handle.remote(sample)``): the sample as it is, the result as a tensor (tree)."""
        if isinstance(request, self._http_request):
            output = await self.processor.infer(self.settings.decode(await request.body()))
            return self.settings.encode(output)
        return _owned(await self.processor.infer(request))

    def stats(self) -> Stats:
        """This replica's batching so far: ``handle.stats.remote().result()``."""
        return self.processor.stats()

    def __del__(self) -> None:
        # Serve calls it on shutdown, after the replica's requests have finished.
        if "processor" in self.__dict__:
            self.processor.close()


def deployment(
    model_factory: ModelFactory,
    *,
    name: str = "dynbatch",
    processor_options: Mapping[str, Any] | None = None,
    decode: Callable[[bytes], Any] = _json_body_to_tensor,
    encode: Callable[[Any], Any] = _to_json,
    **deployment_options: Any,
) -> Deployment:
    """A Ray Serve deployment that batches requests with one DynamicBatchProcessor per replica.

    Each replica builds the model once (``model_factory()``) and serves it through
    ``DynamicBatchProcessor(model=..., **processor_options)``: requests wait at most
    ``max_delay_ms`` for their batch, whose size dynbatch learns (rather than a fixed
    ``max_batch_size`` and timeout). HTTP requests: the body goes through ``decode`` (default:
    a JSON array to a tensor), the model's row through ``encode`` (default: tensors to nested
    lists, returned as JSON). Handle calls, ``handle.remote(tensor)``, get the row as a
    tensor. ``handle.stats.remote()`` returns one replica's ``Stats``.

    ``deployment_options`` go to ``serve.deployment`` (``num_replicas``,
    ``ray_actor_options``...). ``max_ongoing_requests`` defaults to twice the
    ``max_batch_size`` (Serve's own default, 5, would cap every batch at 5): one batch running
    while the next one fills.

    Migrating from ``@serve.batch``, before::

        @serve.deployment(max_ongoing_requests=64)
        class Classifier:
            def __init__(self):
                self.model = load_model()

            @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
            async def predict(self, samples: list[torch.Tensor]) -> list[torch.Tensor]:
                return list(self.model(torch.stack(samples)))

            async def __call__(self, request: Request) -> list[float]:
                return (await self.predict(torch.tensor(await request.json()))).tolist()

        app = Classifier.bind()

    after::

        app = dynbatch.ray.deployment(
            load_model,
            name="Classifier",
            processor_options=dict(max_batch_size=32, max_delay_ms=5),
        ).bind()

    For a replica that does more than decode, infer and encode, write the deployment
    yourself: build ``DynamicBatchProcessor(model=...)`` in ``__init__``, ``await
    self.processor.infer(sample)`` in a handler, ``self.processor.close()`` in ``__del__``.
    """
    if not callable(model_factory):
        raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
    for argument, function in (("decode", decode), ("encode", encode)):
        if not callable(function):
            raise TypeError(f"{argument} must be callable, got {type(function).__name__}")
    options = dict(processor_options or {})
    _check_processor_options(options)
    max_batch_size = options.get("max_batch_size", 1024)
    if isinstance(max_batch_size, int):  # else the replica's processor says what is wrong
        deployment_options.setdefault("max_ongoing_requests", 2 * max_batch_size)
    settings = _ServeSettings(model_factory, options, decode, encode)
    replica_class = type("DynbatchReplica", (_Replica,), {"settings": settings})
    try:
        from ray import serve
    except ImportError as error:  # Ray Data users may not have Serve's dependencies
        raise ImportError(
            f'deployment needs Ray Serve: pip install "ray[serve]" ({error})'
        ) from None
    batched: Deployment = serve.deployment(name=name, **deployment_options)(replica_class)
    return batched
