"""A Triton-backed model whose server is down fails over to its fallback, and comes back when Triton does.

`fraud_triton_fb` forwards to a Triton on a port where nothing listens when the cluster starts, with
`fleet.fallback: fraud` and a breaker that opens after 3 failed batches and probes every 0.5-1 s.
The replicas started anyway (the model reads READY, through its fallback); its answers are fraud's,
with a `fleet-fallback` header; the breaker opens (the repository index says so); then a real
Triton starts on that port and the answers come from it again, without the header, within the
probe interval.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from benchmarks.triton_process import TritonProcess

pytestmark = pytest.mark.integration

MODEL = "fraud_triton_fb"
_PROBE_INTERVAL_S = 1.0  # fleet.breaker.max_cooldown_ms in conftest


def _body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _post(base_url: str, model: str, x: np.ndarray) -> httpx.Response:
    # A new connection per request: the two ingress replicas (SO_REUSEPORT) both see traffic.
    return httpx.post(f"{base_url}/v2/models/{model}/infer", json=_body(x), timeout=30)


def _answer(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _index_entry(base_url: str) -> dict:
    r = httpx.post(f"{base_url}/v2/repository/index", json={}, timeout=30)
    assert r.status_code == 200, r.text
    return next(e for e in r.json() if e["name"] == MODEL)


def _breaker_gauge(base_url: str, want, within_s: float = 5.0) -> float:
    """fleet_breaker_open{model=MODEL} from /metrics once `want(value)` holds (replicas push every 0.5 s)."""
    deadline = time.monotonic() + within_s
    while True:
        text = httpx.get(f"{base_url}/metrics", timeout=30).text
        line = next((x for x in text.splitlines() if x.startswith(f'fleet_breaker_open{{model="{MODEL}"}}')), None)
        value = float(line.split()[-1]) if line else None
        if (value is not None and want(value)) or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def test_a_dead_triton_is_answered_by_the_fallback_then_probed_back(base_url, fleet_cluster, repository):
    _, triton = fleet_cluster
    x = np.random.default_rng(11).standard_normal((3, 30)).astype(np.float32)
    expected = _answer(_post(base_url, "fraud", x))

    started = time.monotonic()
    answers = [_post(base_url, MODEL, x) for _ in range(16)]
    fallback_ms = (time.monotonic() - started) / len(answers) * 1000
    for r in answers:
        assert r.headers.get("fleet-fallback") == "fraud/1", r.headers
        np.testing.assert_allclose(_answer(r), expected, rtol=0, atol=1e-6)
    # Both ingress replicas' breakers opened: the model reads READY, answered by its fallback.
    entries = [_index_entry(base_url) for _ in range(6)]
    for entry in entries:
        assert entry["state"] == "READY", entry
        assert "circuit breaker" in entry.get("reason", "") and "answered by fraud" in entry["reason"], entry
    assert _breaker_gauge(base_url, lambda v: v == 2) == 2  # the metric: both replicas' breakers are open

    proc = TritonProcess.start(
        repository / "fraud" / "1" / "model.pt", "fraud", inputs=[("features", "FP32", (30,))],
        outputs=[("probability", "FP32", (1,))], max_batch_size=256, ports=triton["fallback_ports"],
    )
    try:
        up = time.monotonic()
        first_own = None
        while time.monotonic() - up < 3 * _PROBE_INTERVAL_S + 2:
            r = _post(base_url, MODEL, x)
            np.testing.assert_allclose(_answer(r), expected, rtol=1e-5, atol=1e-6)
            if "fleet-fallback" not in r.headers:
                first_own = time.monotonic() - up
                break
            time.sleep(0.05)
        assert first_own is not None, "no answer came from Triton after it started"
        # Within a probe interval more, both replicas have probed and closed their breakers.
        time.sleep(_PROBE_INTERVAL_S)
        for _ in range(10):
            _post(base_url, MODEL, x)  # each replica's probe, if it has not gone yet
        later = [_post(base_url, MODEL, x) for _ in range(10)]
        assert all("fleet-fallback" not in r.headers for r in later), [r.headers for r in later]
        for r in later:
            np.testing.assert_allclose(_answer(r), expected, rtol=1e-5, atol=1e-6)
        assert "reason" not in _index_entry(base_url)
        assert _breaker_gauge(base_url, lambda v: v == 0) == 0
        print(f"\nfallback answers {fallback_ms:.1f} ms each while Triton was down; "
              f"Triton answered again {first_own:.2f} s after it was up")
    finally:
        proc.stop()
