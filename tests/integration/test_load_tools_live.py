"""The load tools against a real HTTP server: uvicorn + Starlette in a thread of this process.

No Ray cluster: these check what the benchmark numbers mean (statuses, throughput,
latency from the intended send time), so a server with known behaviour is enough:
/ok answers 200 (after ?delay_ms), /busy 503, /close 200 with Connection: close,
and /stall sleeps 0.5 s once after `stall_next` is set while holding a global lock,
so every request behind it queues. A raw asyncio server (`_RawServer`) does what
uvicorn won't: answers dribbled a byte at a time, and hanging up mid-request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.loadgen import Target, closed_loop, open_loop, run, step_load
from benchmarks.wrk import WrkError, phase_pairs, run_alternating, run_alternating_bodies, run_wrk
from cluster.ports import free_port

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class _Server:
    def __init__(self) -> None:
        # Bound here, on a port the kernel picks, and handed to uvicorn: no port to lose between choosing and binding.
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.stall_next = threading.Event()
        self.seen_headers: dict[str, str] = {}
        self._lock: asyncio.Lock | None = None
        app = Starlette(routes=[
            Route("/ok", self.ok, methods=["POST"]),
            Route("/busy", self.busy, methods=["POST"]),
            Route("/close", self.close, methods=["POST"]),
            Route("/stall", self.stall, methods=["POST"]),
            Route("/versions", self.versions, methods=["POST"]),
            Route("/kinds", self.kinds, methods=["POST"]),
            Route("/a", self.phase, methods=["POST"]),
            Route("/b", self.phase, methods=["POST"]),
        ])
        self.kinds_seen: dict[str, int] = {}
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="load-tools-server", daemon=True)

    async def ok(self, request: Request) -> JSONResponse:
        await request.body()
        self.seen_headers = dict(request.headers)
        if delay_ms := float(request.query_params.get("delay_ms", 0)):
            await asyncio.sleep(delay_ms / 1000)
        return JSONResponse({"ok": True})

    async def versions(self, request: Request) -> JSONResponse:
        """Every third answer from version "2", one in seven (of the rest) with no version at all."""
        self.answered = getattr(self, "answered", 0) + 1
        if self.answered % 3 == 0:
            return JSONResponse({"model_name": "m", "model_version": "2", "outputs": []})
        if self.answered % 7 == 0:
            return JSONResponse({"model_name": "m", "outputs": []})
        return JSONResponse({"model_name": "m", "model_version": "1", "outputs": []})

    async def kinds(self, request: Request) -> JSONResponse:
        """200 for the JSON body sent as JSON or the binary body with its header length, 400 otherwise."""
        body, kind = await request.body(), request.headers.get("content-type")
        fits = (kind == "application/json" and body == KIND_BODIES["json"]) or (
            kind == "application/octet-stream" and body == KIND_BODIES["binary"]
            and request.headers.get("inference-header-content-length") == "10")
        self.kinds_seen[kind] = self.kinds_seen.get(kind, 0) + 1
        return JSONResponse({"ok": fits}, status_code=200 if fits else 400)

    async def phase(self, request: Request) -> JSONResponse:
        """Counts requests by (path, the X-Phase header)."""
        key = (request.url.path, request.headers.get("x-phase"))
        self.kinds_seen[key] = self.kinds_seen.get(key, 0) + 1
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
    s.sock.close()


@pytest.fixture
def body_file(tmp_path) -> Path:
    path = tmp_path / "req.body"
    path.write_bytes(b'{"inputs": []}')
    return path


JSON = {"Content-Type": "application/json"}
KIND_BODIES = {"json": b'{"inputs": [1]}', "binary": b'{"inputs":}\x00\x01\xff'}  # (the binary one's header: 10 bytes)


def _sane(latency_ms: dict) -> None:
    values = [latency_ms[k] for k in ("p50", "p90", "p95", "p99", "max")]
    assert all(v is not None and v > 0 for v in values) and values == sorted(values), latency_ms


def test_wrk_counts_every_answer_by_status(server, body_file):
    r = run_wrk(f"{server.url}/ok", body_file, header_length=14, connections=4, duration_s=2)
    assert r.requests > 50 and r.statuses == {"200": r.requests} and r.errors == {}
    assert r.duration_s == pytest.approx(2.0, abs=0.3)
    assert r.throughput_rps == pytest.approx(r.requests / r.duration_s)
    _sane(r.latency_ms)
    assert r.latency_ms["p50"] < 100
    assert server.seen_headers["content-type"] == "application/octet-stream"
    assert server.seen_headers["inference-header-content-length"] == "14"


def test_wrk_counts_answers_by_model_version_when_asked(server, body_file):
    server.answered = 0
    r = run_wrk(f"{server.url}/versions", body_file, connections=1, threads=1, duration_s=1, count_versions=True)
    n = r.requests  # one connection: wrk read the server's first n answers, in order
    assert server.answered - n in (0, 1)
    expected = {"2": n // 3, "none": sum(1 for i in range(1, n + 1) if i % 3 and i % 7 == 0)}
    expected["1"] = n - expected["2"] - expected["none"]
    assert r.requests > 50 and r.versions == expected, (r.versions, n)
    assert run_wrk(f"{server.url}/versions", body_file, connections=1, duration_s=1).versions == {}


def test_alternating_bodies_send_each_body_with_its_own_headers_in_turns(server, tmp_path):
    files = {}
    for kind, body in KIND_BODIES.items():
        files[kind] = tmp_path / f"{kind}.body"
        files[kind].write_bytes(body)
    server.kinds_seen.clear()
    run = run_alternating_bodies(f"{server.url}/kinds", files["json"], files["binary"], 10, duration_s=7, phase_s=1,
                                 connections=2, lead_s=1)
    assert run["errors"] == 0 and all(p["other"] == 0 for p in run["phases"].values())  # every body fit its headers
    pairs = phase_pairs(run["phases"])
    assert len(pairs) >= 2 and all(a > 0 and b > 0 for a, b in pairs)
    binary, json_ = server.kinds_seen["application/octet-stream"], server.kinds_seen["application/json"]
    # phase 0 onwards half of the time each; the lead-in second is JSON's
    assert sum(a for a, _ in pairs) <= binary and sum(b for _, b in pairs) <= json_
    assert 0.25 < binary / (binary + json_) < 0.6


def test_alternating_paths_take_turns_and_only_path_a_carries_its_header(server, body_file):
    server.kinds_seen.clear()
    run = run_alternating(server.url, body_file, "/a", "/b", duration_s=7, phase_s=1, connections=2, lead_s=1,
                          header_a=("X-Phase", "a"))
    assert run["errors"] == 0 and all(p["other"] == 0 for p in run["phases"].values())
    pairs = phase_pairs(run["phases"])
    assert len(pairs) >= 2 and all(a > 0 and b > 0 for a, b in pairs)
    assert set(server.kinds_seen) == {("/a", "a"), ("/b", None)}
    a, b = server.kinds_seen[("/a", "a")], server.kinds_seen[("/b", None)]
    assert sum(x for x, _ in pairs) <= a and sum(y for _, y in pairs) <= b and 0.25 < a / (a + b) < 0.6


def test_wrk_503s_are_statuses_not_throughput(server, body_file):
    r = run_wrk(f"{server.url}/busy", body_file, connections=2, duration_s=1)
    assert r.requests > 0 and r.statuses == {"503": r.requests} and r.throughput_rps == 0.0
    _sane(r.latency_ms)  # fast refusals are still what clients waited for


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


async def test_open_loop_through_uvloop_matches_asyncio(server):
    """`run` (uvloop) and a plain asyncio loop give the same counts for the same schedule."""
    target = [Target("/ok", b"{}", JSON)]
    on_asyncio = await open_loop(HOST, server.port, target, 300, 1.0, seed=2)
    on_uvloop = await asyncio.to_thread(run, open_loop(HOST, server.port, target, 300, 1.0, seed=2))
    for r in (on_asyncio, on_uvloop):
        assert r.statuses == {"200": r.requests} and r.errors == {}
        _sane(r.latency_ms)
        assert r.latency_ms["p50"] < 50
    assert on_uvloop.requests == on_asyncio.requests == pytest.approx(300, rel=0.2)


async def test_closed_loop_on_uvloop_keeps_its_connections_busy(server):
    r = await asyncio.to_thread(run, closed_loop(HOST, server.port, [Target("/ok?delay_ms=20", b"{}", JSON)], 4, 1.0))
    assert 100 <= r.requests <= 220 and r.statuses == {"200": r.requests} and r.errors == {}


class _RawServer:
    """A hand-written HTTP/1.1 server (`_raw_server` runs it in a thread): /drip answers one byte per
    write, /hangup closes without answering, /slow answers after 30 ms; it counts connections."""

    def __init__(self) -> None:
        self.port = 0  # the kernel's pick, once `_raw_server` has bound it
        self.open = self.max_open = self.accepted = 0
        self.handlers: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/hangup":
                    return
                if path == b"/slow":
                    await asyncio.sleep(0.03)
                answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nslow\r\n0\r\n\r\n"
                for i in range(len(answer)) if path == b"/drip" else (None,):
                    writer.write(answer if i is None else answer[i:i + 1])
                    await writer.drain()
                    if i is not None:
                        await asyncio.sleep(0.001)  # one TCP segment per byte
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@contextlib.contextmanager
def _raw_server() -> Iterator[_RawServer]:
    raw, loop = _RawServer(), asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="raw-http-server", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(raw.handle, HOST, 0), loop).result(10)
    raw.port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()
        for task in raw.handlers:
            task.cancel()
        await asyncio.gather(*raw.handlers, return_exceptions=True)

    try:
        yield raw
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def test_answers_dribbled_a_byte_at_a_time_are_parsed():
    with _raw_server() as raw:
        r = await open_loop(HOST, raw.port, [Target("/drip", b"{}", JSON)], 20, 0.5, arrivals="constant")
    assert r.statuses == {"200": 10} and r.errors == {}
    assert r.latency_ms["p50"] >= 40  # ~50 one-byte writes 1 ms apart: completion is the last byte


async def test_a_hang_up_without_an_answer_is_a_read_error():
    with _raw_server() as raw:
        r = await open_loop(HOST, raw.port, [Target("/hangup", b"{}", JSON)], 40, 0.5, arrivals="constant")
    assert r.requests == 0 and r.errors == {"read": 20}


def test_connections_are_opened_on_demand_up_to_max_connections():
    """30 ms answers at 200/s need ~6 connections: with 3 allowed, requests queue for one and wait."""
    with _raw_server() as raw:
        r = run(open_loop(HOST, raw.port, [Target("/slow", b"{}", JSON)], 200, 0.5, arrivals="constant",
                          max_connections=3))
        assert raw.max_open == raw.accepted == 3
    assert r.statuses == {"200": 100} and r.errors == {}
    assert r.latency_ms["max"] > 200  # 100 requests over 3 connections at ~30 ms each: ~1 s of backlog
    with _raw_server() as raw:
        run(open_loop(HOST, raw.port, [Target("/slow", b"{}", JSON)], 20, 0.5, arrivals="constant"))
        assert raw.accepted == 1  # one at a time: one connection, kept alive


def test_requests_queued_for_a_connection_time_out_too():
    """One connection, 30 ms answers, 100/s offered: the backlog grows until requests expire, queued or in flight."""
    with _raw_server() as raw:
        r = run(open_loop(HOST, raw.port, [Target("/slow", b"{}", JSON)], 100, 0.5, arrivals="constant",
                          max_connections=1, timeout_s=0.2))
    assert r.requests + r.errors["timeout"] == 50 and set(r.errors) == {"timeout"}
    assert r.requests >= 5 and r.errors["timeout"] >= 10
    assert r.statuses == {"200": r.requests} and r.latency_ms["max"] <= 200
