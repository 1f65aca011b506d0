"""cluster/dashboards/: the Grafana dashboard's every query as Prometheus itself reads it (promtool, as recording
rules), reading only metrics fleet renders; the multi-node scrape configuration through `promtool check config`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_alert_rules import MONITORING_METRICS
from test_metrics import busy_cluster

from cluster import prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "cluster" / "dashboards"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DASHBOARDS / "fleet.json").read_text())


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def _as_prometheus(expr: str) -> str:
    """A panel's query with Grafana's variables filled in, as Prometheus receives it."""
    return expr.replace("$model", ".*")


def test_every_panel_query_is_valid_promql_as_promtool_reads_recording_rules(dashboard, tmp_path):
    exprs = _exprs(dashboard)
    rules = {"groups": [{"name": "fleet-dashboard", "rules": [
        {"record": f"fleet_dashboard:panel_{i}", "expr": _as_prometheus(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = prometheus.promtool("check", "rules", str(path))
    assert checked.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in checked.stdout, \
        checked.stdout + checked.stderr
    # and the check has teeth: a query Prometheus cannot parse fails it
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "rate(x[1m]"}]}]}))
    assert prometheus.promtool("check", "rules", str(path)).returncode != 0


def test_the_panels_read_only_metrics_fleet_renders_and_cover_what_operators_watch(dashboard):
    rendered = {sample.name for family in text_string_to_metric_families(busy_cluster().render().decode())
                for sample in family.samples}
    used = set(re.findall(r"\bfleet_[a-z_]+[a-z]\b", " ".join(_exprs(dashboard))))
    assert used - rendered - MONITORING_METRICS == set()
    titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("throughput", "errors", "latency", "queue", "execution", "breakers", "drift", "quality",
                  "rollout", "prediction log"):
        assert topic in titles, topic
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "model"}


def test_the_scrape_configuration_passes_promtool_with_fleets_rules(tmp_path):
    shutil.copy(DASHBOARDS / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(prometheus.RULES_FILE, tmp_path / "fleet-rules.yml")  # as its comment says
    checked = prometheus.promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # fleet once (its /metrics is cluster-wide), Ray per node through its own service discovery file
    assert len(jobs["fleet"]["static_configs"][0]["targets"]) == 1
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
