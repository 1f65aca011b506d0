"""A drift scenario on a live cluster: stable traffic stays quiet, a covariate shift raises calibrated alarms
at /drift, in /metrics, in a real Prometheus (the shipped alert rules fire) and at the alert webhook."""

from __future__ import annotations

import time

import httpx
import pytest

from cluster.prometheus import PrometheusServer
from integration._monitoring import fraud_rows, infer_rows, metric_value, wait_until

pytestmark = pytest.mark.integration

MODEL = "fraud_drift"
SHIFTED = {"amount", "hour", "merchant_risk", "distance_km", "is_foreign"}  # what covariate_shift moves (and V1-V9)


def _drift(base_url: str) -> dict:
    """The version's drift report; {} (not yet) while the monitor has had no push from a replica, which
    arrives about once a second after the traffic, so a poll right after the requests may see the 404."""
    r = httpx.get(f"{base_url}/v2/models/{MODEL}/versions/1/drift", timeout=30)
    if r.status_code == 404 and "no traffic seen by the monitor" in r.text:
        return {}
    assert r.status_code == 200, r.text
    return r.json()["versions"]["1"]


def test_a_covariate_shift_raises_calibrated_alarms_seen_by_prometheus_and_the_webhook(fleet_cluster, base_url):
    webhook = fleet_cluster[1]["webhook"]
    with PrometheusServer.start([base_url]) as prom:
        prom.wait_for('up == 1', timeout_s=30)
        x, _ = fraud_rows(4000, seed=31)
        assert all(a["status"] == 200 for a in infer_rows(base_url, MODEL, x, rows_per_request=100,
                                                          fresh_connections=False))
        stable = wait_until(lambda: (d := _drift(base_url)).get("rows", 0) >= 4000 and d, 30, what="4000 rows judged")
        assert stable["alarming"] == [] and len(stable["streams"]) == 32  # 30 features, the score, pca
        for stream in stable["streams"]:
            w = stream["windows"]["rows"]
            assert w["judged"] and w["psi"] < w["psi_threshold"], stream  # calibrated: no alarm on stable traffic
            assert stream["cusum"]["threshold"] > 20  # h = ln(2 S F / share): one false alarm per 864 M rows
        shift_start = time.time()
        x, _ = fraud_rows(6000, seed=32, scenario="covariate_shift")
        assert all(a["status"] == 200 for a in infer_rows(base_url, MODEL, x, rows_per_request=100,
                                                          fresh_connections=False))
        drifted = wait_until(lambda: (d := _drift(base_url)).get("rows", 0) >= 10_000 and len(d["alarming"]) >= 5 and d,
                             30, what="drift alarms")
        alarming = set(drifted["alarming"])
        assert {"amount", "merchant_risk", "distance_km", "score"} <= alarming, alarming
        assert "txn_count_1h" not in alarming and "account_age_days" not in alarming  # the shift left them alone
        for stream in drifted["streams"]:
            if stream["name"] in alarming:
                assert stream["state"] == "alarm" and stream["since"] >= shift_start - 1 and stream["alarms"] >= 1
        alarms = {a["stream"]: a for a in drifted["alarms"]}
        amount = alarms["amount"]
        assert amount["state"] == "alarm" and amount["value"] >= amount["threshold"] and amount["since"] >= shift_start - 1

        metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
        assert metric_value(metrics, "fleet_drift_alarm", model=MODEL, version="1", stream="amount") == 1.0
        assert metric_value(metrics, "fleet_drift_alarm", model=MODEL, version="1", stream="txn_count_1h") == 0.0

        # The shipped rules, in a real Prometheus scraping the cluster: the feature drift alert fires.
        alert = prom.wait_for_alert("FleetFeatureDrift", labels={"model": MODEL, "stream": "amount"}, timeout_s=30)
        assert "/v2/models/fraud_drift/versions/1/drift" in alert["annotations"]["description"]
        prom.wait_for_alert("FleetScoreDrift", labels={"model": MODEL}, timeout_s=30)

    # The webhook got each alarm as JSON with its evidence, with the token read from the token file.
    received = wait_until(lambda: [r for r in webhook.received if r["body"]["model"] == MODEL
                                   and r["body"]["stream"] == "amount"], 15, what="the webhook's alarm")
    event = received[0]
    assert event["authorization"] == "Bearer webhook-secret-token"
    body = event["body"]
    assert body["alarm"] == "drift" and body["state"] == "alarm" and body["version"] == 1
    assert body["value"] >= body["threshold"] and body["evidence"]["windows"]["rows"]["rows"] > 0
    assert body["drift_url"] == f"/v2/models/{MODEL}/versions/1/drift"
