"""The load tools against a real HTTP server: uvicorn + Starlette in a thread of this process.

No Ray cluster: these check what the benchmark numbers mean (statuses, throughput,
latency from the intended send time), so a server with known behaviour is enough:
/ok answers 200 (after ?delay_ms), /busy 503, /close 200 with Connection: close,
and /stall sleeps 0.5 s once after `stall_next` is set while holding a global lock,
so every request behind it queues.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.loadgen import Target, closed_loop, open_loop, step_load
from benchmarks.wrk import WrkError, run_wrk, wrk_available
from cluster.ports import free_port

pytestmark = pytest.mark.integration
needs_wrk = pytest.mark.skipif(not wrk_available(), reason="wrk is not installed: run `make wrk`")

HOST = "127.0.0.1"


class _Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.stall_next = threading.Event()
        self.seen_headers: dict[str, str] = {}
        self._lock: asyncio.Lock | None = None
        app = Starlette(routes=[
            Route("/ok", self.ok, methods=["POST"]),
            Route("/busy", self.busy, methods=["POST"]),
            Route("/close", self.close, methods=["POST"]),
            Route("/stall", self.stall, methods=["POST"]),
        ])
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="load-tools-server", daemon=True)

    async def ok(self, request: Request) -> JSONResponse:
        await request.body()
        self.seen_headers = dict(request.headers)
        if delay_ms := float(request.query_params.get("delay_ms", 0)):
            await asyncio.sleep(delay_ms / 1000)
        return JSONResponse({"ok": True})

    async def busy(self, request: Request) -> JSONResponse:
        return JSONResponse({"error": "busy"}, status_code=503)

    async def close(self, request: Request) -> JSONResponse:
        return JSONResponse({"ok": True}, headers={"Connection": "close"})

    async def stall(self, request: Request) -> JSONResponse:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.stall_next.is_set():
                self.stall_next.clear()
                await asyncio.sleep(0.5)
        return JSONResponse({"ok": True})

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@pytest.fixture(scope="module")
def server():
    s = _Server()
    s.thread.start()
    deadline = time.monotonic() + 10
    while not s.server.started:
        assert time.monotonic() < deadline and s.thread.is_alive(), "test server did not start"
        time.sleep(0.02)
    yield s
    s.server.should_exit = True
    s.thread.join(timeout=10)


@pytest.fixture
def body_file(tmp_path) -> Path:
    path = tmp_path / "req.body"
    path.write_bytes(b'{"inputs": []}')
    return path


JSON = {"Content-Type": "application/json"}


def _sane(latency_ms: dict) -> None:
    values = [latency_ms[k] for k in ("p50", "p90", "p95", "p99", "max")]
    assert all(v is not None and v > 0 for v in values) and values == sorted(values), latency_ms


@needs_wrk
def test_wrk_counts_every_answer_by_status(server, body_file):
    r = run_wrk(f"{server.url}/ok", body_file, header_length=14, connections=4, duration_s=2)
    assert r.requests > 50 and r.statuses == {"200": r.requests} and r.errors == {}
    assert r.duration_s == pytest.approx(2.0, abs=0.3)
    assert r.throughput_rps == pytest.approx(r.requests / r.duration_s)
    _sane(r.latency_ms)
    assert r.latency_ms["p50"] < 100
    assert server.seen_headers["content-type"] == "application/octet-stream"
    assert server.seen_headers["inference-header-content-length"] == "14"


@needs_wrk
def test_wrk_503s_are_statuses_not_throughput(server, body_file):
    r = run_wrk(f"{server.url}/busy", body_file, connections=2, duration_s=1)
    assert r.requests > 0 and r.statuses == {"503": r.requests} and r.throughput_rps == 0.0
    _sane(r.latency_ms)  # fast refusals are still what clients waited for


@needs_wrk
def test_wrk_failure_is_reported_with_its_output(body_file):
    with pytest.raises(WrkError, match="unable to connect"):
        run_wrk(f"http://{HOST}:{free_port()}/ok", body_file, connections=1, duration_s=1)


async def test_open_loop_offers_the_rate(server):
    r = await open_loop(HOST, server.port, [Target("/ok", b"{}", JSON)], 200, 2.0, arrivals="constant")
    assert r.mode == "open" and r.rate_rps == 200
    assert r.requests == pytest.approx(400, rel=0.15) and r.statuses == {"200": r.requests} and r.errors == {}
    assert r.throughput_rps == pytest.approx(200, rel=0.15)
    _sane(r.latency_ms)


async def test_open_loop_counts_a_stall_from_the_intended_send_time(server):
    """Coordinated omission: requests scheduled during a 0.5 s stall are late by the time they waited."""
    server.stall_next.set()
    r = await open_loop(HOST, server.port, [Target("/stall", b"{}", JSON)], 100, 2.0, arrivals="constant",
                        max_connections=1)
    assert not server.stall_next.is_set(), "the stall did not happen"
    assert r.statuses == {"200": r.requests} and r.requests == pytest.approx(200, rel=0.15)
    # ~50 requests were due during the stall; they waited 0.5 s down to ~0 s.
    assert r.latency_ms["max"] >= 450 and r.latency_ms["p99"] >= 400
    assert r.latency_ms["p50"] < 50


async def test_open_loop_mixes_targets_by_weight(server):
    targets = [Target("/ok", b"{}", JSON, weight=3, name="ok"), Target("/busy", b"{}", JSON, weight=1, name="busy")]
    r = await open_loop(HOST, server.port, targets, 200, 1.5, seed=3)
    ok, busy = r.by_target["ok"], r.by_target["busy"]
    assert ok["statuses"] == {"200": ok["requests"]} and busy["statuses"] == {"503": busy["requests"]}
    assert ok["requests"] / r.requests == pytest.approx(0.75, abs=0.08)
    assert r.throughput_rps == pytest.approx(ok["requests"] / r.duration_s)
    assert (ok["rate_rps"], busy["rate_rps"]) == (150.0, 50.0)


async def test_connection_close_answers_are_followed_by_a_new_connection(server):
    r = await open_loop(HOST, server.port, [Target("/close", b"{}", JSON)], 100, 1.0, arrivals="constant")
    assert r.statuses == {"200": 100} and r.errors == {}


async def test_transport_errors_are_counted_not_raised(server):
    refused = await open_loop(HOST, free_port(), [Target("/ok", b"{}", JSON)], 40, 0.5, arrivals="constant")
    assert refused.requests == 0 and refused.errors == {"connect": 20} and refused.latency_ms["p50"] is None
    slow = await open_loop(HOST, server.port, [Target("/ok?delay_ms=1500", b"{}", JSON)], 10, 0.5,
                           arrivals="constant", timeout_s=0.5)
    assert slow.requests == 0 and slow.errors == {"timeout": 5}


async def test_closed_loop_keeps_each_connection_busy(server):
    r = await closed_loop(HOST, server.port, [Target("/ok?delay_ms=20", b"{}", JSON)], 4, 1.0)
    assert r.mode == "closed" and r.connections == 4 and r.errors == {}
    # 4 connections, each ~20 ms per request: at most ~200 req/s, and close to it
    assert 100 <= r.requests <= 220 and r.statuses == {"200": r.requests}
    assert r.latency_ms["p50"] == pytest.approx(20, abs=15)


async def test_step_load_gives_one_result_per_step_with_rising_throughput(server):
    steps = await step_load(HOST, server.port, [Target("/ok", b"{}", JSON)], [50, 150, 300], 1.0)
    assert [s.rate_rps for s in steps] == [50, 150, 300]
    throughputs = [s.throughput_rps for s in steps]
    assert throughputs == sorted(throughputs)
    for s in steps:
        assert s.throughput_rps == pytest.approx(s.rate_rps, rel=0.3) and s.errors == {}
