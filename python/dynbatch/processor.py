"""DynamicBatchProcessor: the facade. It checks its arguments, builds the engine and hands out
its consumers: the iterator (``processor(data)``, ``map``), the server (``submit``,
``submit_many``, ``infer``) and the trainer (``steps``, ``fit``)."""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from . import _core
from .arguments import (
    check_fraction,
    check_padding,
    check_profile,
    check_serving_arguments,
    check_size,
)
from .engine import Engine, EngineOptions
from .errors import ProcessorClosed
from .fit import FitResult, StepMetrics, Trainer
from .iteration import BatchIterator, map_batches
from .memory import MemoryMonitor
from .progress import ProgressBar, total_of
from .scheduler import Scheduler
from .serving import Server
from .stats import Stats
from .training import StepIterator, TrainingState, length_of, open_steps
from .transfer import DeviceTarget

__all__ = ["BatchIterator", "DynamicBatchProcessor"]

# Samples read ahead are tracked in fixed tables: this bounds their size (and rows fit 32 bits).
_MAX_READ_AHEAD = 2**22


class DynamicBatchProcessor:
    """Forms batches from an iterable of samples, sizing each batch from what it learns.

    ``for batch in processor(samples)`` yields batches in input order; every sample lands in
    exactly one batch, and each batch holds between ``min_batch_size`` and ``max_batch_size``
    samples except possibly the last (and the parts of a batch split after running out of
    memory). ``processor.map(fn, samples)`` runs ``fn`` on every batch and returns one result
    per sample, splitting and retrying batches that run out of memory.

    The size comes from cost models learned per input shape (latency ``a + b*n`` from the
    caller's time per batch, peak memory ``m0 + m1*n`` from torch's allocator on a GPU): the
    largest size that fits the free memory, meets ``latency_slo_ms`` and is not past the
    throughput knee, below a ceiling lowered by every out-of-memory error. With no size
    arguments it starts at 1 and grows until it has found the knee. The core collates the next
    batch while the caller works on the current one.

    Args:
        max_batch_size: the largest batch (default 1024).
        min_batch_size: the smallest batch, except a last one (default 1).
        latency_slo_ms: keep a batch's predicted compute time within this (default none).
        oom_errors: exception types that mean "out of memory", besides
            ``torch.cuda.OutOfMemoryError`` (e.g. a simulated one in tests).
        prefetch: batches prepared ahead of the caller (default 1).
        memory_fraction: before a memory model exists, the share of available memory the
            staged bytes of one batch may take.
        knee_tolerance: how close to its ceiling throughput must be to stop growing (0.05).
        telemetry: a ``dynbatch._core.Telemetry`` to read memory from (default: NVML for the
            current CUDA device when usable, host memory otherwise, sampled every 50 ms by a
            core thread). One passed in is not closed by ``close()``.
        clock: nanoseconds now (default ``time.perf_counter_ns``); simulations inject one.
        memory_monitor: per-batch memory feedback (default: torch's CUDA allocator when CUDA
            is available, none otherwise); simulations inject one.
        collate: ``"stack"`` (default; every sample's leaves share their shapes) or ``"pad"``:
            tensor leaves may differ in their first dimension and are padded to the longest
            in the batch with ``pad_value``; batches are then ``PaddedBatch`` objects
            (``.data``, ``.lengths``, ``.mask``, ``.indices``). All padded leaves of one sample
            share their length. With ``pad_to_multiple_of``, every batch's padded length is a
            multiple of it. A pass (the iterator, ``map``) groups samples of similar length
            over its read-ahead (``(prefetch + 1) * max_batch_size`` samples, at least 1024),
            as a length-sorted encode does: batches then come out of input order
            (``.indices`` says which samples they hold; ``map`` returns results in input
            order); serving groups the requests queued by length, and a request joins a batch
            only where the padding it adds costs less than the learned fixed cost of a batch
            of its own; ``bucket_window=N`` groups over the next N waiting instead, in serving
            and training too, and ``bucket_window=1`` keeps input order. ``max_tokens=T`` caps a
            batch by its padded size (samples x padded length); a sample longer than that
            alone is an ``InvalidSampleError``.
        profile: where the sizing keeps what it learned between runs, so that a second run
            of the same job starts at the learned size and only verifies it: None (default)
            names it after the job (the file and function that made the processor, and the
            first model it runs: its class and parameter shapes), a str names it, False keeps
            none. Entries are per input layout (the first sample's leaf shapes and dtypes),
            device and dtype, under ``$DYNBATCH_CACHE_DIR`` (default ``~/.cache/dynbatch``).
            Read on the first batch; written once the sizing has settled, when a pass ends
            (at most every 10 s), when the processor closes and at exit. A corrupt, foreign
            or stale entry, or a folder that cannot be written, gives one warning, never an
            error. With an injected ``clock`` (a simulation) None keeps none.

    Serving (``submit``, ``submit_many``, ``infer``; needs ``model``):
        model: the callable run on each batch; its output (a tensor, or dicts/tuples/lists of
            tensors) is split along the first dimension into per-request results.
        max_delay_ms: the longest a request waits for its batch to fill (default 5): a short
            queue is dispatched after this, a long one fills the target size at once, and a
            partial batch keeps growing while the model is busy. 0 dispatches at once.
        max_queue_size: requests waiting at most (default 65536); beyond it ``submit`` raises
            ``QueueFull`` at once, or after waiting ``block_timeout`` seconds for room.
        isolate_errors: when the model raises on a batch, bisect it so that only the
            request(s) causing the error get it, as their own exception (default True).
        priority_aging_ms: a waiting request gains one priority level per this (default 100),
            so low priorities are delayed by a saturating high-priority stream, not starved.
        scheduler: the ``Scheduler`` that orders this task's batches against other tasks on
            the device (default: the device's shared one); ``task_priority`` ranks this task.

    Device:
        device: where batches arrive (``"cuda"``, ``"cuda:1"``, a ``torch.device``; default:
            where they were collated, the host). The core stages them in page-locked slots and
            copies them on its own stream while the model works on the previous batch; the
            caller's current stream waits on the copy, and the memory comes from torch's
            caching allocator, marked for every stream that touches it. A device that cannot
            be used (no CUDA in this build or in torch, no GPU, no such index) is a
            ``ValueError`` here. ``"dynbatch-sim"`` is the core's simulated device (tests).
    """

    def __init__(
        self,
        max_batch_size: int = 1024,
        min_batch_size: int = 1,
        *,
        latency_slo_ms: float | None = None,
        oom_errors: tuple[type[BaseException], ...] = (),
        prefetch: int = 1,
        memory_fraction: float = 0.25,
        knee_tolerance: float = 0.05,
        telemetry: _core.Telemetry | None = None,
        clock: Callable[[], int] | None = None,
        memory_monitor: MemoryMonitor | None = None,
        collate: str = "stack",
        pad_value: float = 0,
        pad_to_multiple_of: int | None = None,
        bucket_window: int | None = None,
        max_tokens: int | None = None,
        model: Callable[[Any], Any] | None = None,
        max_delay_ms: float = 5.0,
        max_queue_size: int = 65536,
        block_timeout: float | None = None,
        isolate_errors: bool = True,
        priority_aging_ms: float = 100.0,
        scheduler: Scheduler | None = None,
        task_priority: int = 0,
        device: str | int | torch.device | None = None,
        profile: str | bool | None = None,
    ) -> None:
        self.max_batch_size = check_size("max_batch_size", max_batch_size)
        self.min_batch_size = check_size("min_batch_size", min_batch_size)
        if self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be at least "
                f"min_batch_size ({min_batch_size})"
            )
        self.prefetch = check_size("prefetch", prefetch)
        if (self.prefetch + 1) * self.max_batch_size > _MAX_READ_AHEAD:
            raise ValueError(
                f"(prefetch + 1) * max_batch_size must be at most {_MAX_READ_AHEAD} samples "
                f"(the read-ahead), got ({prefetch} + 1) * {max_batch_size}"
            )
        check_fraction("memory_fraction", memory_fraction, inclusive=True)
        check_fraction("knee_tolerance", knee_tolerance, inclusive=False)
        if latency_slo_ms is not None:
            if isinstance(latency_slo_ms, bool) or not isinstance(latency_slo_ms, (int, float)):
                raise TypeError(
                    f"latency_slo_ms must be a number, got {type(latency_slo_ms).__name__}"
                )
            if not 1e-3 <= latency_slo_ms <= 3.6e6:  # 1 us .. an hour, and finite
                raise ValueError(
                    f"latency_slo_ms must be between 0.001 and 3600000, got {latency_slo_ms}"
                )
        if not isinstance(oom_errors, tuple) or not all(
            isinstance(kind, type) and issubclass(kind, BaseException) for kind in oom_errors
        ):
            raise TypeError("oom_errors must be a tuple of exception types")
        if telemetry is not None and not isinstance(telemetry, _core.Telemetry):
            raise TypeError("telemetry must be a dynbatch._core.Telemetry")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning nanoseconds")
        pad, pad_multiple = check_padding(collate, pad_value, pad_to_multiple_of)
        for name, value in (("bucket_window", bucket_window), ("max_tokens", max_tokens)):
            if value is not None:
                if collate != "pad":
                    raise ValueError(f"{name} needs collate='pad'")
                check_size(name, value)
        check_serving_arguments(
            model,
            max_delay_ms,
            max_queue_size,
            block_timeout,
            isolate_errors,
            priority_aging_ms,
            scheduler,
            task_priority,
        )

        check_profile(profile)
        target = None if device is None else DeviceTarget(device)
        self._engine = Engine(
            EngineOptions(
                min_batch_size=self.min_batch_size,
                max_batch_size=self.max_batch_size,
                prefetch=self.prefetch,
                latency_slo_ms=None if latency_slo_ms is None else float(latency_slo_ms),
                oom_errors=oom_errors,
                memory_fraction=float(memory_fraction),
                knee_tolerance=float(knee_tolerance),
                pad_value=pad,
                pad_multiple=pad_multiple,
                bucket_window=bucket_window or 0,
                max_tokens=max_tokens or 0,
                group_by_length=collate == "pad" and bucket_window is None,
                profile=profile,
            ),
            telemetry=telemetry,
            clock=clock,
            memory_monitor=memory_monitor,
            target=target,
        )
        self._iterators: weakref.WeakSet[BatchIterator] = weakref.WeakSet()
        self._step_iterators: weakref.WeakSet[StepIterator] = weakref.WeakSet()
        self._training = TrainingState()
        self._closed = False
        self.model = model
        self._server: Server | None = None
        if model is not None:
            self._server = Server(
                self._engine,
                model,
                max_delay_ms=float(max_delay_ms),
                max_queue_size=max_queue_size,
                block_timeout=block_timeout,
                isolate_errors=isolate_errors,
                aging_ms=float(priority_aging_ms),
                scheduler=scheduler,
                task_priority=task_priority,
            )
            # Dropped without close(): the worker finishes the queue and stops on its own.
            weakref.finalize(self, self._server.release)

    def __call__(self, data: Iterable[Any], /, *, progress: bool = False) -> BatchIterator:
        """Batches of ``data`` (any iterable of samples), as an iterator.

        ``progress=True`` shows a tqdm bar (samples, samples/s, batch size, memory in use;
        the total from ``len(data)`` when it has one); it needs tqdm."""
        if self._closed:
            raise RuntimeError("this DynamicBatchProcessor is closed")
        try:
            source = iter(data)
        except TypeError:
            raise TypeError(
                "DynamicBatchProcessor expects an iterable of samples (a list, a generator...), "
                f"got {type(data).__name__}"
            ) from None
        bar = ProgressBar(total_of(data), self._engine.telemetry) if progress else None
        iterator = BatchIterator(
            self._engine, source, bar, materialized=isinstance(data, (list, tuple))
        )
        self._iterators.add(iterator)
        return iterator

    def map(
        self, fn: Callable[[Any], Any], data: Iterable[Any], /, *, progress: bool = False
    ) -> list[Any]:
        """``fn`` on every batch of ``data``; one result per sample, in input order.

        ``fn``'s output (a tensor, or dicts/tuples/lists of tensors) is split along its first
        dimension, which must equal the batch size. A batch whose ``fn`` runs out of memory is
        split in halves and retried, and the size ceiling is lowered; each sample's result
        comes from exactly one successful call. Any other exception propagates.
        ``progress=True`` shows a tqdm bar, as for ``processor(data, progress=True)``.
        """
        if not callable(fn):
            raise TypeError(f"map needs a callable model, got {type(fn).__name__}")
        return map_batches(self(data, progress=progress), fn)

    def steps(
        self,
        data: Iterable[Any],
        /,
        *,
        samples_per_step: int,
        epochs: int = 1,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        max_steps: int | None = None,
        process_group: Any = None,
        progress: bool = False,
    ) -> StepIterator:
        """Micro-batches of optimizer steps of ``samples_per_step`` samples, for a training
        loop of your own; see ``fit`` for one that owns the step.

        Each ``MicroBatch`` has ``data`` (the batch), ``weight`` (its share of the step),
        ``step``, ``epoch``, ``first``, ``last`` and ``indices``; the engine sizes the
        micro-batches as it sizes inference batches, and none holds samples of two steps::

            for mb in processor.steps(data, samples_per_step=64, shuffle=True, seed=0):
                (loss_fn(model, mb.data) * mb.weight).backward()
                if mb.last:
                    optimizer.step()
                    optimizer.zero_grad()

        Out of memory: zero the gradients and call ``report_oom()`` (on the iterator or the
        processor); the whole step comes again in smaller micro-batches. ``epochs`` counts the
        epoch ends this pass crosses, from where the last ``steps``/``fit`` call stopped (the
        processor keeps the position: ``state_dict()``); ``max_steps`` stops it sooner. With
        ``process_group`` (e.g. ``torch.distributed.group.WORLD``), every step is shared among
        its ranks (``samples_per_step`` counts them all) and ``weight`` is scaled for
        DistributedDataParallel's gradient averaging.
        """
        self._check_open()
        return self._track(
            open_steps(
                self._engine,
                self._training,
                data,
                samples_per_step=samples_per_step,
                epochs=epochs,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                max_steps=max_steps,
                process_group=process_group,
                progress=progress,
            )
        )

    def fit(
        self,
        model: Any,
        optimizer: Any,
        loss_fn: Callable[[Any, Any], Any],
        data: Iterable[Any],
        /,
        *,
        samples_per_step: int | str,
        epochs: int = 1,
        shuffle: bool = False,
        seed: int | None = None,
        max_grad_norm: float | None = None,
        lr_scheduler: Any = None,
        drop_last: bool = False,
        progress: bool = False,
        grad_scaler: Any = None,
        max_steps: int | None = None,
        lr_scaling: str | None = "adascale",
        base_samples_per_step: int = 32,
        max_samples_per_step: int | None = None,
        on_step: Callable[[StepMetrics], object] | None = None,
    ) -> FitResult:
        """Trains ``model`` on ``data``: optimizer steps of ``samples_per_step`` samples in
        micro-batches the engine sizes; returns per-step metrics (``FitResult``).

        ``data`` yields samples (typically ``(input, target)`` tuples; ``dynbatch.paired(X,
        y)`` makes them from two tensors); ``loss_fn(model, batch)`` returns the batch's mean
        loss as a scalar tensor. Each step: gradients zeroed, forward and backward per
        micro-batch (the loss scaled by its share of the step, so the step's gradient is a
        batch of ``samples_per_step``'s), then clipping to ``max_grad_norm``,
        ``optimizer.step()`` (through ``grad_scaler`` when given) and ``lr_scheduler.step()``.
        The model's train/eval mode is left as it is. A DistributedDataParallel model shares
        each step among its ranks and synchronises gradients on the step's last micro-batch
        only (``no_sync()`` on the others).

        Out of memory in forward or backward: the gradients are zeroed and the step runs
        again in smaller micro-batches (the lower ceiling holds for the rest of the run). A
        non-finite loss skips the step (counted in ``skipped_steps``; one warning).

        ``samples_per_step="auto"``: each step's size is chosen for goodput (throughput times
        statistical efficiency from the measured gradient noise scale) between
        ``base_samples_per_step`` (32) and ``max_samples_per_step`` (default 32 times the
        base, at most the data's length), and the optimizer's learning rate, read as tuned
        for ``base_samples_per_step``, is scaled for the chosen size: ``lr_scaling=
        "adascale"`` (AdaScale's gain from the noise scale), ``"sqrt"``, ``"linear"`` or None.
        A fixed ``samples_per_step`` uses the learning rate as it is.

        Calling ``fit`` again continues where the last call (or ``steps`` pass) stopped: the
        sample order's position, the learned sizes and the adaptive state; ``epochs`` counts
        the epoch ends this call crosses and ``max_steps`` stops it sooner. ``on_step`` is
        called with each step's ``StepMetrics`` (evaluation, logging); returning True stops
        training after that step.
        """
        self._check_open()
        trainer = Trainer(
            self._engine,
            self._training,
            model,
            optimizer,
            loss_fn,
            samples_per_step=samples_per_step,
            length=length_of(data),
            base_samples_per_step=base_samples_per_step,
            max_samples_per_step=max_samples_per_step,
            lr_scaling=lr_scaling,
            max_grad_norm=max_grad_norm,
            lr_scheduler=lr_scheduler,
            grad_scaler=grad_scaler,
            on_step=on_step,
        )
        steps = self._track(
            trainer.open(
                data,
                epochs=epochs,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                max_steps=max_steps,
                progress=progress,
            )
        )
        return trainer.run(steps)

    def state_dict(self) -> dict[str, Any]:
        """The training position (epoch, samples used, steps taken, shuffling seed), the
        adaptive step-size state and what the sizing learned (its cost lines and out-of-memory
        ceiling, and the device it learned them on), for ``load_state_dict`` in a restarted
        job."""
        return {
            "version": 2,
            "training": self._training.state_dict(),
            "sizing": self._engine.sizing_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a ``state_dict()``: the next ``fit``/``steps`` call resumes the same
        sample order where it stopped, and the sizing starts at the learned size (and is not
        overwritten by the on-disk profile). Sizing learned on another device is ignored with
        a warning; a version 1 state (no sizing) is accepted."""
        version = state.get("version") if isinstance(state, dict) else None
        has_sizing = version == 2 and "sizing" in state
        if version not in (1, 2) or "training" not in state or (version == 2) != has_sizing:
            raise ValueError("load_state_dict expects what DynamicBatchProcessor.state_dict() made")
        if version == 2:
            self._engine.restore_sizing(state["sizing"])
        self._training.load_state_dict(state["training"])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DynamicBatchProcessor is closed")

    def _track(self, steps: StepIterator) -> StepIterator:
        """Counts a training pass among the live ones (stats, report_oom, close)."""
        self._step_iterators.add(steps)
        return steps

    def submit(
        self, sample: Any, /, *, priority: int = 0, timeout: float | None = None
    ) -> Future[Any]:
        """Queues one sample for ``model``; returns its future (thread-safe, never blocks
        unless ``block_timeout`` allows waiting for room in a full queue; from a done-callback
        running on the processor's worker it never waits: only the worker makes room, so a
        full queue raises ``QueueFull`` at once).

        Larger ``priority`` runs first. A request still waiting ``timeout`` seconds after
        ``submit`` ends with ``RequestTimeout`` and never reaches the model. The future's
        ``cancel()`` works until the request is dispatched. The result is the request's row of
        the model's output; a model error reaches only the request(s) that cause it. Done-
        callbacks run on the thread that ended the request (the worker, the deadline watcher,
        or the caller of ``cancel``/``close``), after waiters have woken.
        """
        server = self._server
        if server is None or self._closed:
            server = self._serving()  # raises the reason
        return server.submit(sample, priority, timeout)

    def submit_many(
        self, samples: Iterable[Any], /, *, priority: int = 0, timeout: float | None = None
    ) -> list[Future[Any]]:
        """``submit`` for many samples at once (one call into the core). Every sample is
        checked before any is queued; when the queue fills, the requests that did not fit end
        with ``QueueFull`` (their futures say so) and the others run."""
        return list(self._serving().submit_many(samples, priority, timeout))

    def infer(
        self, sample: Any, /, *, priority: int = 0, timeout: float | None = None
    ) -> Awaitable[Any]:
        """``await processor.infer(sample)``: ``submit`` for asyncio, from a running event
        loop. Returns an awaitable (an ``asyncio.Future``; no task per request); bad input
        raises at the call. Results reach the event loop once per batch; cancelling the
        awaiting task cancels the request."""
        return self._serving().infer(sample, priority, timeout)

    def _serving(self) -> Server:
        if self._server is None:
            raise RuntimeError(
                "submit/infer need a model: DynamicBatchProcessor(..., model=your_model)"
            )
        if self._closed:
            raise ProcessorClosed("this DynamicBatchProcessor is closed")
        return self._server

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit (the types ``report_oom`` expects)."""
        return self._engine.is_out_of_memory(error)

    def report_oom(self) -> None:
        """The batch the loop is working on ran out of memory: its samples come back in
        smaller batches, and the size ceiling drops. Call it from the loop that caught the
        error, before asking for the next batch."""
        holding = [
            (since, iterator)
            for iterator in self._passes()
            if (since := iterator.outstanding_since_ns) is not None
        ]
        if not holding:
            raise RuntimeError("report_oom() needs a batch from a live iteration to report")
        max(holding, key=lambda pair: pair[0])[1].report_oom()

    def _passes(self) -> list[BatchIterator | StepIterator]:
        """The live iterations: batch passes and training passes."""
        return [*self._iterators, *self._step_iterators]

    def stats(self) -> Stats:
        """Counters, batch-size histogram, throughput, latency, memory and the learned costs."""
        live_ns = sum(iterator.active_ns() for iterator in self._passes())
        server = self._server
        if server is None:
            return self._engine.stats(live_ns)
        return self._engine.stats(
            live_ns + server.active_ns(),
            serving=True,
            isolated_errors=server.isolated_errors,
            queued=server.queued(),
        )

    def reset_stats(self) -> None:
        """Starts the counters and the memory peaks afresh (the learned costs are kept)."""
        self._engine.reset_stats()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops every live iteration, the serving worker and the telemetry thread.

        Serving: no request is accepted after ``close``. With ``drain`` (the default) every
        queued request is still run (``timeout`` bounds the wait, in seconds); without it, or
        past the timeout, close() does not wait for the model: every request not done ends
        with ``ProcessorClosed``, those of a batch in the model included (that call runs to
        its end in the background and its output is discarded). From a done-callback, drain
        returns at once and the queue is run once the callback returns. Idempotent. A
        processor dropped without ``close`` runs its queue and then stops.
        """
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close(drain, timeout)
        for iterator in self._passes():
            iterator.close()
        self._engine.close()

    def __enter__(self) -> DynamicBatchProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        model = "" if self.model is None else f", model={self.model!r}"
        return (
            f"DynamicBatchProcessor(max_batch_size={self.max_batch_size}, "
            f"min_batch_size={self.min_batch_size}, prefetch={self.prefetch}{model})"
        )
