"""A real Prometheus scrapes the session cluster's /metrics with fleet's alerting rules loaded.

The `prometheus` fixture is the one place a test gets a Prometheus on this cluster: a scenario that
should raise an alert drives the cluster and then waits for it, e.g.
`prometheus.wait_for_alert("FleetFeatureDrift", labels={"model": "fraud"}, timeout_s=60)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from cluster.prometheus import RULES_FILE, PrometheusServer

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [0.25] * 4}]}
SUCCESS = 'fleet_inference_request_success_total{job="fleet",model="libtorch",version="1"}'


@pytest.fixture(scope="module")
def prometheus(base_url) -> Iterator[PrometheusServer]:
    with PrometheusServer.start([base_url]) as server:
        server.wait_for('up{job="fleet"} == 1', timeout_s=30)
        yield server


def test_prometheus_scrapes_the_cluster_and_evaluates_every_rule_without_error(base_url, prometheus):
    (target,) = prometheus.targets()
    assert target["health"] == "up" and target["lastError"] == ""
    assert target["labels"]["instance"] == urlsplit(base_url).netloc

    for _ in range(5):
        assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=BODY).status_code == 200
    # What fleet counts once the replicas have pushed (every 0.5 s) is what Prometheus reads next.
    counted = 0.0
    for _ in range(40):
        text = httpx.get(f"{base_url}/metrics").text
        line = next((x for x in text.splitlines()
                     if x.startswith('fleet_inference_request_success_total{model="libtorch",version="1"}')), "")
        counted = float(line.rsplit(" ", 1)[1]) if line else 0.0
        if counted >= 5:
            break
        time.sleep(0.25)
    assert counted >= 5
    (sample,) = prometheus.wait_for(f"{SUCCESS} >= {counted}", timeout_s=20)
    assert sample["value"] >= counted

    rules = prometheus.wait_rules_evaluated(timeout_s=30)
    shipped = {rule["alert"] for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]}
    assert {rule["name"] for rule in rules} == shipped
    assert [(rule["name"], rule["lastError"]) for rule in rules if rule["health"] != "ok"] == []
    # The error-rate and latency expressions read fleet's live series (not just parse): they return numbers
    # (a rate once two scrapes are in).
    (rate,) = prometheus.wait_for('sum by (model, version) (rate({__name__=~"fleet_inference_request_(success|failure)'
                                  '_total",model="libtorch"}[1m]))', timeout_s=10)
    assert rate["metric"] == {"model": "libtorch", "version": "1"} and rate["value"] >= 0
    (p99,) = prometheus.query('histogram_quantile(0.99, sum by (le) '
                              '(fleet_inference_request_duration_seconds_bucket{model="libtorch"}))')
    assert 0 < p99["value"] < 10
