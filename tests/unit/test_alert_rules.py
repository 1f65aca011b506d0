"""fleet's alerting rules (cluster/alerts/fleet-rules.yml) as Prometheus itself checks and evaluates them.

`promtool test rules` runs cluster/alerts/fleet-rules.test.yml: hand-written series on which each alert
must fire, with the annotations it must render, and series on which it must stay silent.
"""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import busy_cluster

from cluster import prometheus
from serving import errors

# What the serving side renders next to the inference metrics (serving/monitoring/exposition.py): the contract
# the rules are written against.
MONITORING_METRICS = {
    "fleet_drift_alarm", "fleet_drift_psi", "fleet_drift_psi_threshold", "fleet_drift_cusum",
    "fleet_drift_cusum_threshold",
    "fleet_quality_alarm", "fleet_quality_roc_auc", "fleet_quality_accuracy", "fleet_quality_label_error_rate",
    "fleet_quality_calibration_error", "fleet_quality_labelled_rows", "fleet_quality_reference_roc_auc",
    "fleet_quality_reference_label_error_rate",
    "fleet_prediction_log_rows_total", "fleet_prediction_log_dropped_total", "fleet_prediction_log_cpu_seconds_total",
    "fleet_grpc_transport_events_total",
    "fleet_feedback_labels_total", "fleet_feedback_duplicates_total", "fleet_feedback_joined_total",
    "fleet_feedback_unmatched_total",
    "fleet_input_violations_total", "fleet_retrain_jobs_total",
    "fleet_rollout_decisions_total", "fleet_rollout_stage_alarm", "fleet_rollout_weight", "fleet_rollout_stage",
}
REQUIRED_ALERTS = {
    "FleetFeatureDrift", "FleetScoreDrift", "FleetMultivariateDrift", "FleetLabelErrorIncrease",
    "FleetRocAucBelowReference", "FleetHighErrorRate", "FleetHighP99Latency", "FleetPredictionLogDrops",
    "FleetCircuitBreakerOpen",
}


@pytest.fixture(scope="module")
def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(prometheus.RULES_FILE.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert all("alert" in rule for rule in rules), "only alerting rules here"
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    return by_name


def test_promtool_check_rules_passes():
    result = prometheus.promtool("check", "rules", str(prometheus.RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_fires_where_it_should_and_nowhere_else():
    result = prometheus.promtool("test", "rules", str(prometheus.RULES_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_test_file_covers_each_alert_firing_and_silent(alerts):
    cases = [case for test in yaml.safe_load(prometheus.RULES_TEST_FILE.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for name in alerts:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never shown silent"


def test_the_required_alerts_are_there_with_what_to_look_at(alerts):
    assert REQUIRED_ALERTS <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert "for" in rule, f"{name}: say how long it must hold, 0m included"
        assert {"summary", "description"} <= set(rule["annotations"]), name
        description = rule["annotations"]["description"]
        assert "{{ $labels.model }}" in description, f"{name}: the description names the model"
        assert re.search(r"\b(look at|check)\b", description, re.IGNORECASE), f"{name}: say what to look at"
    # fleet's drift and label-error alarms are sequential and calibrated already: no waiting on top.
    for name in ("FleetFeatureDrift", "FleetScoreDrift", "FleetMultivariateDrift", "FleetLabelErrorIncrease"):
        assert alerts[name]["for"] == "0m"


def test_the_error_rate_leaves_out_exactly_the_clients_own_failures(alerts):
    """A 4xx is the client's doing: every FleetError with a 4xx status (and Cancelled, a client that left) is
    left out of the error rate, every 5xx counts."""
    text = alerts["FleetHighErrorRate"]["expr"] + alerts["FleetHighErrorRate"]["annotations"]["description"]
    excluded = set(re.findall(r'reason!~"([^"]+)"', text))
    assert len(excluded) == 1, "one list of client reasons, the same everywhere it is used"
    reasons = set(excluded.pop().split("|"))
    subclasses = {cls.__name__: cls.status for cls in vars(errors).values()
                  if isinstance(cls, type) and issubclass(cls, errors.FleetError) and cls is not errors.FleetError}
    client = {name for name, status in subclasses.items() if 400 <= status < 500}
    assert reasons == client | {"Cancelled"}
    assert {"BackendError", "Overloaded", "DeadlineExceeded", "ModelUnavailable"} <= set(subclasses) - reasons


def test_every_metric_the_rules_read_is_one_fleet_renders(alerts):
    """A misspelt or renamed metric makes a rule silently never fire: every name in an expression or an
    annotation's query is rendered by the monitor or is one of the monitoring metrics of the contract."""
    rendered = {sample.name for family in text_string_to_metric_families(busy_cluster().render().decode())
                for sample in family.samples}
    text = prometheus.RULES_FILE.read_text() + prometheus.RULES_TEST_FILE.read_text()
    used = set(re.findall(r"\bfleet_[a-z_]+[a-z]\b", text)) - {"fleet_rules"}
    assert used - rendered - MONITORING_METRICS == set()
    assert {"fleet_inference_request_failure_total", "fleet_inference_request_duration_seconds_bucket",
            "fleet_breaker_open", "fleet_inference_queue_time_seconds_total"} <= used & rendered
