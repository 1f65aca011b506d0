"""Overload against the running cluster: refusals at once, accepted requests keep their latency, memory
stays bounded, and a client that disconnects has its queued work cancelled.

`slow` runs ~100 ms per batch of up to 8 rows, one batch at a time, with a queue of 2, in each of
the 2 ingress replicas; `slow_deep` one row per batch with a queue of 64.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import numpy as np
import orjson
import pytest
from ray.util.state import list_actors

from benchmarks.loadgen import Target, closed_loop, open_loop, open_loop_records

pytestmark = pytest.mark.integration


def _body(name: str = "x") -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})


def _target(model: str) -> Target:
    return Target(f"/v2/models/{model}/infer", _body(), {"Content-Type": "application/json"})


def _ingress_rss_bytes() -> list[int]:
    pids = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name and a.class_name.endswith(":ingress")]
    assert pids, "no ingress replica found"
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        out.append(rss_kb * 1024)
    return out


def test_accepted_requests_keep_their_p99_at_three_times_the_sustainable_rate(fleet_cluster):
    settings = fleet_cluster[0]
    host, port, target = settings.host, settings.port, [_target("slow")]
    sustained = asyncio.run(closed_loop(host, port, target, connections=20, duration_s=3.0))
    rate = sustained.throughput_rps
    assert rate > 10, sustained
    light = asyncio.run(open_loop(host, port, target, rate / 3, duration_s=4.0, seed=1))
    records, heavy = asyncio.run(open_loop_records(host, port, target, rate * 3, duration_s=4.0, seed=2))
    print(f"\nslow: sustainable {rate:.0f} req/s; p99 of 200s at {rate / 3:.0f} req/s "
          f"{light.latency_2xx_ms['p99']:.0f} ms, at {rate * 3:.0f} req/s {heavy.latency_2xx_ms['p99']:.0f} ms; "
          f"statuses {heavy.statuses}; median refusal "
          f"{np.median(records[records[:, 2] == 503, 3]) * 1000:.1f} ms")
    # `slow`'s queue is deliberately tiny (2 per replica): even at a third of the capacity a Poisson burst
    # of three arrivals within one batch finds it full (about 1 % of requests). The light run is there to
    # measure the p99 of the accepted ones; a refusal there must stay rare.
    assert not light.errors and set(light.statuses) <= {"200", "503"}, light
    assert light.statuses.get("503", 0) <= 0.05 * light.requests, light.statuses
    assert not heavy.errors, heavy.errors
    assert set(heavy.statuses) == {"200", "503"}, heavy.statuses
    assert heavy.statuses["503"] >= 0.25 * heavy.requests  # much of 3x the capacity is refused ...
    assert heavy.throughput_rps > 0.7 * rate  # ... while the model keeps doing what it can
    # An accepted request waits for at most the batch in flight and then runs in the next (the queue of 2 fits in
    # one batch of 8): about twice the light p99, where a batch mostly runs alone. At 3x the rate both replicas'
    # batches and the load generator share the 2 cores, which stretches each batch (2.03x on CI once); hence
    # 2.5x. A queue without a bound would be seconds behind by the end (the backlog grows by 2x the rate a second).
    assert heavy.latency_2xx_ms["p99"] <= 2.5 * light.latency_2xx_ms["p99"], (light.latency_2xx_ms,
                                                                                 heavy.latency_2xx_ms)
    # A refusal is answered at once, not after the queue it could not join.
    refused_ms = np.median(records[records[:, 2] == 503, 3]) * 1000
    assert refused_ms < light.latency_2xx_ms["p50"] / 4, (refused_ms, light.latency_2xx_ms)


def test_refusals_come_with_retry_after_and_a_reason(base_url):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{base_url}/v2/models/slow/infer", content=_body(),
                                                       headers={"content-type": "application/json"})
                                          for _ in range(40)))

    refused = [r for r in asyncio.run(burst()) if r.status_code == 503]
    assert refused
    assert all(int(r.headers["retry-after"]) >= 1 and "max_queue_size" in r.json()["error"] for r in refused)


def test_memory_stays_bounded_under_a_flood_of_large_requests(fleet_cluster):
    """64 connections send ~0.9 MB JSON bodies back to back at the overloaded `slow` for 4 s (about a
    gigabyte offered): each replica's queue and its connections bound what it holds."""
    settings = fleet_cluster[0]
    # About 0.9 MB (JSON whitespace), under the cluster's 1 MiB body limit.
    big = orjson.dumps({"inputs": [{"name": "x", "shape": [8, 1], "datatype": "FP32", "data": [0.5] * 8}]})
    big = big[:-1] + b" " * 900_000 + b"}"
    before = _ingress_rss_bytes()
    flood = asyncio.run(closed_loop(settings.host, settings.port,
                                    [Target("/v2/models/slow/infer", big, {"Content-Type": "application/json"})],
                                    connections=64, duration_s=4.0, timeout_s=30))
    after = _ingress_rss_bytes()
    offered_mb = flood.requests * len(big) / 1e6
    growth_mb = [(a - b) / 1e6 for a, b in zip(after, before)]
    print(f"\nflood: {flood.requests} requests ({offered_mb:.0f} MB), statuses {flood.statuses}, "
          f"ingress RSS growth {[f'{g:.0f} MB' for g in growth_mb]}")
    assert not flood.errors, flood.errors
    assert set(flood.statuses) <= {"200", "503"} and flood.statuses.get("503"), flood.statuses
    assert offered_mb > 100
    assert max(growth_mb) < 150, growth_mb


def _send_raw(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v2/models/slow_deep/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def _executions(base_url: str, model: str) -> int:
    """The model's execution count once the replicas' pushes have settled."""
    previous = None
    while True:
        stats = httpx.get(f"{base_url}/v2/models/{model}/stats").json()["model_stats"][0]
        if stats["execution_count"] == previous:
            return previous
        previous = stats["execution_count"]
        time.sleep(0.7)


def test_a_client_that_disconnects_has_its_queued_work_cancelled(base_url, fleet_cluster):
    """30 requests queue on `slow_deep` (one ~100 ms request at a time per replica: 1.5 s of work per
    replica); 26 of the clients hang up at once. Their requests are withdrawn, not computed."""
    port = fleet_cluster[0].port
    before = _executions(base_url, "slow_deep")
    socks = [_send_raw(port, _body()) for _ in range(30)]
    time.sleep(0.15)
    for sock in socks[4:]:
        sock.close()
    answers = []
    for sock in socks[:4]:
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        answers.append(data.split(b"\r\n", 1)[0])
        sock.close()
    assert answers == [b"HTTP/1.1 200 OK"] * 4
    ran = _executions(base_url, "slow_deep") - before
    print(f"\n30 queued, 26 disconnected: {ran} executed")
    # The 4 kept, plus at most what each replica had started before the hang-ups (2 or 3 each).
    assert 4 <= ran <= 12, ran
    # Nothing is left behind: a new request is answered promptly.
    started = time.monotonic()
    ok = httpx.post(f"{base_url}/v2/models/slow_deep/infer", content=_body(), timeout=30,
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200 and time.monotonic() - started < 2.0
