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


def test_every_dashboard_query_runs_on_the_live_cluster_and_every_series_it_reads_is_scraped(base_url, prometheus):
    """cluster/dashboards/fleet.json against this cluster: each metric a panel reads is in its /metrics, and each
    panel's query runs on the Prometheus scraping it without an error."""
    import json
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "cluster" / "dashboards" / "fleet.json").read_text())
    exprs = [t["expr"].replace("$model", ".*") for p in dashboard["panels"] for t in p["targets"]]
    for _ in range(3):
        assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=BODY).status_code == 200
    wrong = {"inputs": [{**BODY["inputs"][0], "shape": [1, 5], "data": [0.25] * 5}]}  # a failure, counted by reason
    assert httpx.post(f"{base_url}/v2/models/libtorch/infer", json=wrong).status_code == 400
    used = set(re.findall(r"\bfleet_[a-z_]+[a-z]\b", " ".join(exprs)))
    # The request path's metrics are in every scrape once a model has answered and failed; the monitor's exist
    # once it has judged drift, quality, labels or a rollout (their names: tests/unit/test_dashboards.py).
    request_path = {m for m in used if m.startswith(("fleet_inference_", "fleet_breaker_"))}
    assert len(request_path) >= 8
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(f"{base_url}/metrics").text
        scraped = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
        if request_path <= scraped or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert request_path - scraped == set()
    prometheus.wait_for('up{job="fleet"} == 1', timeout_s=30)
    for expr in exprs:
        prometheus.query(expr)  # raises with Prometheus's message on an error
