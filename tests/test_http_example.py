"""examples/http_server.py as a real server: uvicorn in its own process, driven over HTTP by
many concurrent clients, must answer each one with its own row and batch them together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from examples.http_server import FEATURES, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 256
STARTUP_TIMEOUT_S = 60.0
JSON_HEADERS = {"content-type": "application/json"}
MALFORMED_BODIES = [
    '{"features": [1.0]}',
    '{"features": [' + ", ".join(["1.0"] * (FEATURES + 1)) + "]}",
    '{"features": [' + ", ".join(['"one"'] * FEATURES) + "]}",
    '{"features": [' + ", ".join(["NaN"] * FEATURES) + "]}",
    '{"values": [' + ", ".join(["1.0"] * FEATURES) + "]}",
    "not json",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/stats", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """The example served by uvicorn on a free local port; stopped (and checked) afterwards."""
    port = _free_port()
    log = tmp_path / "server.log"
    # A file, not a pipe: uvicorn logs every request, and a full pipe would stall the server.
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "http_server.py"), "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # leaves a core for the clients
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(process, url, log)
        yield url
    finally:
        returncode = _stop(process)
    # uvicorn re-raises the SIGTERM after its graceful shutdown (lifespan and drain included).
    output = log.read_text()
    assert returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output


async def _post_all(url: str, features: torch.Tensor) -> tuple[list[Any], list[Any], Any, str]:
    """Every well-formed and malformed request at once; then the server's stats and metrics."""
    connections = REQUESTS + len(MALFORMED_BODIES)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:
        good = [client.post("/predict", json={"features": row.tolist()}) for row in features]
        bad = [
            client.post("/predict", content=body, headers=JSON_HEADERS) for body in MALFORMED_BODIES
        ]
        # The malformed requests go out in the middle of the well-formed ones.
        middle = REQUESTS // 2
        responses = await asyncio.gather(*good[:middle], *bad, *good[middle:])
    # A fresh connection: one the burst left idle may be closed by uvicorn's keep-alive timeout
    # (5 s) just as a request reuses it, which a loaded machine reaches ("Server disconnected").
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        stats = await client.get("/stats")
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    bad_responses = responses[middle : middle + len(bad)]
    good_responses = responses[:middle] + responses[middle + len(bad) :]
    assert stats.status_code == 200, stats.text
    return good_responses, bad_responses, stats.json(), metrics.text


def test_concurrent_requests_are_answered_correctly_and_batched(server_url: str) -> None:
    features = torch.randn(REQUESTS, FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = build_model()(features)

    good, bad, stats, metrics = asyncio.run(_post_all(server_url, features))

    for index, response in enumerate(good):
        assert response.status_code == 200, (index, response.text)
        scores = torch.tensor(response.json()["scores"])
        # The server's batches are smaller than this one, and may round differently.
        assert torch.allclose(scores, expected[index], rtol=1e-4, atol=1e-5), index
    for body, response in zip(MALFORMED_BODIES, bad, strict=True):
        assert response.status_code == 422, (body, response.text)
    # Malformed requests never reach the processor: it saw exactly the well-formed ones.
    assert stats["samples"] == REQUESTS, stats
    assert stats["mean_batch_size"] > 1, stats
    assert f"dynbatch_samples_total {REQUESTS}" in metrics.splitlines(), metrics
