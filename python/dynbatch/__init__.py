"""dynbatch: dynamic batching for PyTorch with a compiled C++/CUDA core.

    import dynbatch as ds
    processor = ds.DynamicBatchProcessor(max_batch_size=64, min_batch_size=8)
    for batch in processor(samples):
        output = model(batch)
    print(processor.stats())

Serving: ``ds.DynamicBatchProcessor(model=model)`` then ``processor.submit(sample)`` (a
Future), ``processor.submit_many(samples)`` or ``await processor.infer(sample)``.

Training: ``processor.fit(model, optimizer, loss_fn, data, samples_per_step=64)`` (or
``"auto"``), or ``for mb in processor.steps(data, samples_per_step=64)`` in a loop of your own.
"""

from __future__ import annotations

from . import _core
from .collate import collate
from .errors import (
    DynbatchError,
    InvalidSampleError,
    ProcessorClosed,
    ProcessorForked,
    QueueFull,
    RequestTimeout,
    UnsupportedLeafError,
)
from .fit import FitResult, StepMetrics
from .info import build_info, telemetry
from .padding import PaddedBatch
from .processor import BatchIterator, DynamicBatchProcessor
from .scheduler import Scheduler
from .stats import Stats
from .training import MicroBatch, StepIterator, paired

__all__ = [
    "BatchIterator",
    "DynamicBatchProcessor",
    "DynbatchError",
    "FitResult",
    "InvalidSampleError",
    "MicroBatch",
    "PaddedBatch",
    "ProcessorClosed",
    "ProcessorForked",
    "QueueFull",
    "RequestTimeout",
    "Scheduler",
    "Stats",
    "StepIterator",
    "StepMetrics",
    "UnsupportedLeafError",
    "__version__",
    "build_info",
    "collate",
    "paired",
    "telemetry",
]

# Not build_info(): its device probe would create a CUDA context in every importing process.
__version__: str = _core.__version__
