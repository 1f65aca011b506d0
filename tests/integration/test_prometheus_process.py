"""`cluster.prometheus.PrometheusServer`: a real Prometheus with fleet's rules against a /metrics it scrapes.

No Ray here: the target is a small HTTP server that serves a `MonitorState`'s exposition plus whatever
extra lines a test sets, so an alert can be made to fire on demand, as the serving side's gauges will.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster import prometheus
from cluster.ports import free_port
from cluster.prometheus import PrometheusServer
from serving.metrics import StatsRecorder
from serving.monitor import MonitorState

pytestmark = pytest.mark.integration

DRIFT = """\
# HELP fleet_drift_alarm 1 while the drift test of a stream is in alarm
# TYPE fleet_drift_alarm gauge
fleet_drift_alarm{model="fraud",version="1",stream="amount"} 1
fleet_drift_alarm{model="fraud",version="1",stream="hour"} 0
# HELP fleet_drift_psi PSI of a stream against its reference
# TYPE fleet_drift_psi gauge
fleet_drift_psi{model="fraud",version="1",stream="amount",window="rows"} 0.42
"""


class Exporter:
    """An HTTP /metrics on a free loopback port: a monitor's text plus `extra`."""

    def __init__(self) -> None:
        self.state = MonitorState()
        self.extra = ""
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.state.render() + exporter.extra.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    ex = Exporter()
    rec = StatsRecorder()
    for _ in range(3):
        rec.success("fraud", "1", 2_000_000, 500_000, 1_000_000)
    rec.failure("fraud", "1", "BackendError", 1_000_000)
    ex.state.push("replica-0", rec.take(), {("fraud", "1"): 0})
    yield ex
    ex.server.shutdown()
    ex.server.server_close()


def test_it_scrapes_evaluates_fleets_rules_and_fires_an_alert_then_stops_cleanly(exporter):
    started = time.monotonic()
    prom = PrometheusServer.start([exporter.url])
    try:
        assert time.monotonic() - started < 30
        up = prom.wait_for('up{job="fleet"} == 1', timeout_s=30)
        assert up[0]["metric"]["instance"] == exporter.url.removeprefix("http://")
        (success,) = prom.wait_for('fleet_inference_request_success_total{model="fraud"}', timeout_s=10)
        assert success["value"] == 3.0
        rules = prom.wait_rules_evaluated(timeout_s=30)
        assert {r["name"] for r in rules} >= {"FleetFeatureDrift", "FleetHighErrorRate", "FleetHighP99Latency"}
        assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
        assert prom.alerts() == []  # nothing is wrong yet

        exporter.extra = DRIFT  # the monitor reports a drift alarm: the rule fires at the next evaluation
        alert = prom.wait_for_alert("FleetFeatureDrift", labels={"model": "fraud"}, timeout_s=30)
        assert alert["labels"]["stream"] == "amount" and alert["labels"]["version"] == "1"
        assert "PSI 0.42 over the last rows window" in alert["annotations"]["description"]
        assert "/v2/models/fraud/versions/1/drift" in alert["annotations"]["description"]
        assert [a["labels"]["stream"] for a in prom.alerts()] == ["amount"]  # not "hour", whose alarm is 0
    finally:
        prom.stop()
    assert not prom.is_running()
    assert not prom.workdir.exists()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past our own connections' TIME_WAIT
        s.bind(("127.0.0.1", prom.port))
        s.listen()  # nobody listens there any more
    prom.stop()  # twice is fine


def test_a_port_taken_before_prometheus_binds_it_is_replaced(exporter, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    offered: list[int] = []

    def ports(count: int) -> list[int]:
        port = taken.getsockname()[1] if not offered else free_port()
        offered.append(port)
        return [port]

    monkeypatch.setattr(prometheus, "free_ports", ports)
    try:
        with PrometheusServer.start([exporter.url]) as prom:
            assert offered[0] == taken.getsockname()[1] and prom.port == offered[-1] != offered[0]
            assert {r["name"] for r in prom.rules()} >= {"FleetFeatureDrift"}  # ours: it loaded fleet's rules
    finally:
        taken.close()


def test_a_broken_rule_file_fails_the_start_with_prometheus_own_words(exporter, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: rate(up[\n")
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fleet-prometheus-*"))
    with pytest.raises(RuntimeError, match="(?s)exited with code.*broken.yml"):
        PrometheusServer.start([exporter.url], rule_files=[broken])
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fleet-prometheus-*")) == before  # nothing left over


def test_targets_that_one_job_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="mix"):
        PrometheusServer.start(["http://127.0.0.1:1/metrics", "https://127.0.0.1:2/metrics"])
    with pytest.raises(ValueError, match="do not exist"):
        PrometheusServer.start(["127.0.0.1:1"], rule_files=["/nonexistent/rules.yml"])
