"""`GET /metrics` is cluster-wide: it adds up every ingress replica (the cluster runs two)."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import prometheus

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "input__0", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}


def _scrape(base_url: str) -> dict:
    text = httpx.get(f"{base_url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = s.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_every_request_across_ingress_replicas(base_url):
    time.sleep(1.0)  # earlier tests' counts reach the monitor (replicas push every 0.5 s)
    before = _scrape(base_url)
    n_ok, n_bad = 40, 6
    for _ in range(n_ok):
        # A new connection per request: HAProxy spreads them over both ingress replicas.
        assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=BODY).status_code == 200
    for _ in range(n_bad):
        bad = {"inputs": [dict(BODY["inputs"][0], shape=[2, 5])]}
        assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=bad).status_code == 400
    labels = {"model": "libtorch", "version": "1"}

    def delta(name, **extra):
        return _value(after, name, **labels, **extra) - _value(before, name, **labels, **extra)

    deadline = time.monotonic() + 10
    while True:  # each replica pushes what it counted every 0.5 s
        after = _scrape(base_url)
        settled = delta("fleet_inference_request_success_total") >= n_ok and \
            delta("fleet_inference_request_failure_total", reason="InvalidInput") >= n_bad
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert delta("fleet_inference_request_success_total") == n_ok
    assert delta("fleet_inference_request_failure_total", reason="InvalidInput") == n_bad
    assert delta("fleet_inference_count_total") == 2 * n_ok  # two rows per request
    assert 1 <= delta("fleet_inference_exec_count_total") <= n_ok
    assert delta("fleet_inference_request_duration_seconds_count") == n_ok
    assert delta("fleet_inference_request_duration_seconds_bucket", le="+Inf") == n_ok
    assert delta("fleet_inference_request_time_seconds_total") == \
        pytest.approx(delta("fleet_inference_request_duration_seconds_sum"))
    assert 0 < delta("fleet_inference_request_time_seconds_total") < n_ok * 5.0  # seconds, not µs
    assert 0 < delta("fleet_inference_compute_infer_time_seconds_total") <= \
        delta("fleet_inference_request_time_seconds_total")
    assert ("fleet_inference_pending_requests", tuple(sorted(labels.items()))) in after


def test_stats_endpoint_agrees_with_metrics(base_url):
    samples = _scrape(base_url)
    stats = httpx.get(f"{base_url}/v2/models/libtorch/versions/1/stats").json()["model_stats"][0]
    labels = {"model": "libtorch", "version": "1"}
    assert stats["inference_stats"]["success"]["count"] == \
        _value(samples, "fleet_inference_request_success_total", **labels)
    assert stats["execution_count"] == _value(samples, "fleet_inference_exec_count_total", **labels)
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]


def test_promtool_finds_nothing_wrong_with_the_live_metrics(base_url):
    """Prometheus' own linter on the cluster's /metrics after successes and failures of several models."""
    assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=BODY).status_code == 200
    assert httpx.post(f"{base_url}/v2/models/fraud/infer", json=BODY).status_code == 400  # 4 features, not 30
    time.sleep(1.0)  # pushed by the replicas (every 0.5 s)
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert 'fleet_inference_request_failure_total{model="fraud"' in response.text
    assert prometheus.check_metrics(response.text) == ""
