"""Serving a torch model over HTTP with FastAPI: concurrent requests share batches.

    pip install fastapi uvicorn
    python examples/http_server.py --port 8000
    curl -X POST localhost:8000/predict -H 'content-type: application/json' \
        -d '{"features": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1, 1, 1, 1, 1, 1]}'
    curl localhost:8000/stats
    curl localhost:8000/metrics     # Prometheus text format

Each request awaits its own row of the model's output; dynbatch gathers the requests that
arrive together into one batch, so the model runs once per batch instead of once per request.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, FiniteFloat

import dynbatch as ds

FEATURES = 16
CLASSES = 4


def build_model(seed: int = 0) -> torch.nn.Module:
    """The served model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES)
        )
    return model.eval()


def inference_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # The model runs on dynbatch's worker thread, so inference mode is set there, per batch.
    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        return model(batch)

    return run


class PredictRequest(BaseModel):
    # Finite: NaN or infinity would come back as scores that JSON cannot carry.
    features: Annotated[list[FiniteFloat], Field(min_length=FEATURES, max_length=FEATURES)]


class PredictResponse(BaseModel):
    scores: list[float]


class StatsResponse(BaseModel):
    batches: int
    samples: int
    mean_batch_size: float
    latency_p50_ms: float  # per batch: first request queued to results out
    latency_p99_ms: float
    throughput: float  # samples per second while serving


def create_app(
    *, seed: int = 0, request_timeout_s: float = 1.0, max_batch_size: int = 64
) -> FastAPI:
    """An app with its own processor, started with the server and drained when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        processor = ds.DynamicBatchProcessor(
            max_batch_size=max_batch_size, model=inference_fn(build_model(seed)), max_delay_ms=5.0
        )
        app.state.processor = processor
        try:
            yield
        finally:
            processor.close(drain=True)

    app = FastAPI(title="dynbatch example", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes each bad input back, and a NaN input cannot be written as JSON.
        problems = [
            {key: problem[key] for key in ("loc", "msg", "type")} for problem in error.errors()
        ]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> PredictResponse:
        processor: ds.DynamicBatchProcessor = request.app.state.processor
        features = torch.tensor(body.features, dtype=torch.float32)
        try:
            scores = await processor.infer(features, timeout=request_timeout_s)
        except ds.QueueFull as error:
            raise HTTPException(503, "too many requests waiting; retry later") from error
        except ds.RequestTimeout as error:
            raise HTTPException(504, f"not served within {request_timeout_s} s") from error
        return PredictResponse(scores=scores.tolist())

    @app.get("/stats")
    async def stats(request: Request) -> StatsResponse:
        processor: ds.DynamicBatchProcessor = request.app.state.processor
        snapshot = processor.stats()
        return StatsResponse(
            **{name: getattr(snapshot, name) for name in StatsResponse.model_fields}
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        processor: ds.DynamicBatchProcessor = request.app.state.processor
        return PlainTextResponse(
            processor.stats().to_prometheus(), media_type="text/plain; version=0.0.4"
        )

    return app


app = create_app()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the example model over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
