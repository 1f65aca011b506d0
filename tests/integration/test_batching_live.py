"""Dynamic batching in the running cluster: concurrent requests share executions, lone ones never wait."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _body(x: np.ndarray, name: str = "features", timeout_us: int | None = None) -> dict:
    doc = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if timeout_us is not None:
        doc["parameters"] = {"timeout": timeout_us}
    return doc


def _stats(base_url: str, model: str) -> dict:
    entries = httpx.get(f"{base_url}/v2/models/{model}/stats").json()["model_stats"]
    return entries[0]


def _settled_stats(base_url: str, model: str) -> dict:
    """Statistics once every ingress replica has pushed what it counted (they push every 0.5 s)."""
    previous = _stats(base_url, model)
    while True:
        time.sleep(0.7)
        current = _stats(base_url, model)
        if current["inference_count"] == previous["inference_count"]:
            return current
        previous = current


def test_concurrent_requests_are_batched_and_answered_correctly(base_url):
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1 + i % 3, 30)).astype(np.float32) for i in range(192)]
    before = _settled_stats(base_url, "fraud")

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{base_url}/v2/models/fraud/infer", json=_body(x)) for x in xs)
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    # Each caller got its own rows back, in its shape.
    for x, r in zip(xs, responses):
        out = r.json()["outputs"][0]
        assert out["shape"] == [x.shape[0], 1]
    # Same rows in two requests give the same answer wherever they were batched.
    solo = httpx.post(f"{base_url}/v2/models/fraud/infer", json=_body(xs[5])).json()["outputs"][0]["data"]
    np.testing.assert_allclose(solo, responses[5].json()["outputs"][0]["data"], rtol=1e-6)

    rows = sum(x.shape[0] for x in xs) + xs[5].shape[0]
    deadline = time.monotonic() + 10
    while True:
        after = _stats(base_url, "fraud")
        inferences = after["inference_count"] - before["inference_count"]
        if inferences >= rows or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == rows
    assert executions < len(xs), f"{executions} executions for {len(xs)} concurrent requests"
    # No request has more than 3 rows: a batch of more holds several requests, concatenated.
    assert max(b["batch_size"] for b in after["batch_stats"]) > 3


def test_lone_request_does_not_wait_for_the_queue_delay(base_url):
    """fraud_slowq waits up to 200 ms to fill a batch, but never when a request is alone."""
    x = np.zeros((1, 30), np.float32)
    with httpx.Client(timeout=30) as client:
        client.post(f"{base_url}/v2/models/fraud_slowq/infer", json=_body(x))  # connection warm-up
        times = []
        for _ in range(15):
            start = time.perf_counter()
            r = client.post(f"{base_url}/v2/models/fraud_slowq/infer", json=_body(x))
            times.append(time.perf_counter() - start)
            assert r.status_code == 200
    assert statistics.median(times) < 0.100, f"median {statistics.median(times) * 1e3:.1f} ms"
    stats = _settled_stats(base_url, "fraud_slowq")  # every replica's counts are in
    assert stats["inference_stats"]["queue"]["count"] >= 16
    assert stats["inference_stats"]["queue"]["ns"] / stats["inference_stats"]["queue"]["count"] < 50e6


def test_request_timing_out_in_the_queue_gets_504(base_url):
    """`slow_deep` runs one request at a time per ingress replica (25-100 ms each here). Sixty-four busy
    requests on as many connections give each replica about 32 to run, most of a second at least (the
    kernel spreads connections over the replicas at random), so a request with a 20 ms timeout sent
    0.3 s after them finds its replica busy and queues behind them, and expires. (With 12 busy requests
    and 0.05 s, then 24 and 0.25 s, a loaded machine twice let the late request find a replica idle.)"""
    x = np.ones((1, 1), np.float32)

    async def run():
        limits = httpx.Limits(max_connections=72, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            busy = [asyncio.create_task(client.post(f"{base_url}/v2/models/slow_deep/infer", json=_body(x, "x")))
                    for _ in range(64)]
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            late = await client.post(f"{base_url}/v2/models/slow_deep/infer", json=_body(x, "x", timeout_us=20_000))
            waited = time.perf_counter() - started
            return await asyncio.gather(*busy), late, waited

    busy, late, waited = asyncio.run(run())
    assert [r.status_code for r in busy] == [200] * 64
    assert late.status_code == 504, late.text
    assert "timed out" in late.json()["error"]
    assert waited < 5.0


def test_full_queue_is_refused_with_503_and_retry_after(base_url):
    """`slow` has max_queue_size 2: a burst past it is refused at once, not queued forever."""
    x = np.ones((1, 1), np.float32)

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"{base_url}/v2/models/slow/infer", json=_body(x, "x")) for _ in range(12))
            )

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 3 and 503 in codes, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert "max_queue_size" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
