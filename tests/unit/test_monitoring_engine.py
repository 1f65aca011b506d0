"""The monitor's engine without Ray: drift steps from pushed counts, the label join into quality and the label
detector, alarms to the audit file, the retrain trigger's rules, and the metrics promtool accepts."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cluster.prometheus import check_metrics
from serving.model_config import TensorSpec, make_config
from serving.monitoring.actor import MonitorActor
from serving.monitoring.feedback import LabelWriter, Labels
from serving.monitoring.logrows import LogRecord, LogSchema
from serving.monitoring.predlog import PredictionLog
from serving.monitoring.retrain import RetrainTrigger
from serving.registry import ModelRepository

NAMES = ["f0", "f1", "f2"]
EDGES = np.linspace(-2.5, 2.5, 21)
P = np.diff(np.concatenate([[0.0], __import__("scipy").stats.norm.cdf(EDGES[1:-1]), [1.0]]))  # folded N(0,1)


def reference_counts(m: int = 50_000) -> list[int]:
    return np.random.default_rng(0).multinomial(m, P).tolist()


@pytest.fixture
def engine_setup(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    stats = {n: {"mean": 0.0, "std": 1.0, "edges": EDGES.tolist(), "counts": reference_counts()} for n in NAMES}
    metadata = {"feature_names": NAMES, "reference_stats": stats, "metrics": {"roc_auc": 0.9},
                "monitoring": {"scores": {"edges": np.linspace(0, 1, 11).tolist(), "counts": [1000] * 10,
                                          "rows": 10_000, "output": "probability"},
                               "label_error": {"rate": 0.05, "rows": 8000, "threshold": 0.5}}}
    repo.publish("m", {"model.pt": b"not loaded by the monitor"}, metadata,
                 config=make_config("m", [TensorSpec("features", "FP32", (3,))],
                                    [TensorSpec("probability", "FP32", (1,))], max_batch_size=8,
                                    parameters={"preprocess": "standardize"}))
    options = {"repository": repo.root_uri, "data_dir": str(tmp_path / "data"), "drift_window_rows": 2000,
               "retrain_after_s": None}
    actor = MonitorActor(options, start_thread=False)
    yield actor, tmp_path / "data", repo
    actor.close()


def step(rng, rows: int, shift: float = 0.0) -> dict:
    """One replica push: drift counts [3, 22] of `rows` N(shift, 1) rows per feature (unfolded), and scores."""
    counts = []
    for j in range(3):
        x = rng.normal(shift if j == 0 else 0.0, 1.0, rows)
        inner, _ = np.histogram(np.clip(x, EDGES[0], EDGES[-1]), EDGES)
        counts.append([0, *inner.tolist(), 0])
    score = [0, *rng.multinomial(rows, np.full(10, 0.1)).tolist(), 0]
    return {"drift": {("m", "1"): {"features": counts, "score": [score], "rows": rows}},
            "log": {"m": {"written": rows, "dropped": 0, "writer_ns": 1_000_000, "request_path_ns": 250_000}},
            "grpc": {"calls_refused": 2, "replies_dropped": 0}}


def test_stable_steps_stay_quiet_and_a_shift_raises_an_alarm_with_its_evidence(engine_setup):
    actor, data, _ = engine_setup
    rng = np.random.default_rng(1)
    for _ in range(20):
        actor.push("r1", {}, monitoring=step(rng, 500))
        assert actor.tick() == []
    events = []
    for _ in range(20):
        actor.push("r1", {}, monitoring=step(rng, 500, shift=0.3))
        events += actor.tick()
    assert [e["stream"] for e in events if e["state"] == "alarm"] == ["f0"]
    event = events[0]
    assert event["model"] == "m" and event["version"] == 1 and event["value"] >= event["threshold"]
    report = actor.report("drift", "m", "1")["versions"]["1"]
    assert report["alarming"] == ["f0"] and report["rows"] == 20_000
    assert [a["stream"] for a in report["alarms"]] == ["f0"]
    audit = [json.loads(line) for line in (data / "audit" / "monitor.jsonl").read_text().splitlines()]
    assert audit[0]["event"] == "alarm" and audit[0]["stream"] == "f0" and audit[0]["evidence"]["windows"]
    text = actor.render().decode()
    assert 'fleet_drift_alarm{model="m",stream="f0",version="1"} 1.0' in text
    assert 'fleet_prediction_log_rows_total{model="m"} 20000.0' in text
    assert 'fleet_prediction_log_cpu_seconds_total{model="m",part="writer"} 0.04' in text  # 40 pushes of 1 ms
    assert 'fleet_prediction_log_cpu_seconds_total{model="m",part="request_path"} 0.01' in text
    assert 'fleet_grpc_transport_events_total{event="calls_refused"} 80.0' in text  # 40 pushes of 2
    assert 'fleet_grpc_transport_events_total{event="replies_dropped"} 0.0' in text
    assert check_metrics(text) == ""  # promtool check metrics reports nothing


def test_labels_join_into_quality_and_a_rising_error_rate_raises_the_label_alarm(engine_setup):
    actor, data, _ = engine_setup
    log = PredictionLog(str(data), "r1", flush_rows=1, flush_interval_s=60)
    log.register("m", 1, LogSchema(ModelRepository(actor.engine.repository.root_uri).spec("m"),
                                   {"feature_names": NAMES}))
    writer = LabelWriter(str(data), "w")
    rng = np.random.default_rng(3)
    n = 4000
    score = rng.random(n).astype(np.float32)
    wrong = rng.random(n) < np.r_[np.full(2000, 0.05), np.full(2000, 0.15)]  # 5 % -> 15 % errors
    label = np.where(wrong, score < 0.5, score >= 0.5).astype(np.int64)
    ids = [f"q{i}" for i in range(n)]
    now_us = time.time_ns() // 1000
    log.append(LogRecord(model="m", version=1, date=time.strftime("%Y-%m-%d", time.gmtime()), rows=n,
                         request_ids=ids, request_rows=None, arrival_us=now_us + np.arange(n, dtype=np.int64),
                         latency_us=np.ones(n, np.int64), queue_us=np.ones(n, np.int64), compute_us=1,
                         answered_by="model", key_ids=None, inputs={"features": np.zeros((n, 3), np.float32)},
                         outputs={"probability": score[:, None]}))
    assert log.flush(10)
    log.close()
    writer.write("m", Labels(ids, np.zeros(n, np.int32), label, 0))
    events = actor.tick()
    assert [(e["stream"], e["state"]) for e in events] == [("label_error", "alarm")]
    quality = actor.report("quality", "m", None)
    v = quality["versions"]["1"]
    assert v["labelled"] == n and v["rows"]["rows"] == n
    from sklearn.metrics import roc_auc_score

    assert v["rows"]["roc_auc"] == pytest.approx(roc_auc_score(label, score.astype(np.float64)), abs=1e-9)
    assert v["label_error"]["state"] == "alarm" and v["reference"]["rate"] == 0.05
    assert quality["labels"]["joined"] == n and quality["labels"]["pending"] == 0
    assert check_metrics(actor.render()) == ""


def test_the_retrain_trigger_submits_once_per_held_alarm_and_respects_one_job_and_the_cooldown(tmp_path):
    from serving.monitoring.alerts import AuditLog

    clock = [1000.0]
    submitted, status = [], {}

    def submit(entrypoint, metadata):
        submitted.append((entrypoint, metadata))
        status[f"job-{len(submitted)}"] = "RUNNING"
        return f"job-{len(submitted)}"

    audit = AuditLog(str(tmp_path))
    trigger = RetrainTrigger(60.0, 600.0, submit, status.get, audit, clock=lambda: clock[0])
    alarm = [{"stream": "f0", "since": 990.0, "version": 3}]
    params = {"fleet.retrain.args": "--epochs 2"}
    assert trigger.check("fraud", params, 3, alarm) is None  # held 10 s of 60
    clock[0] = 1051.0
    done = trigger.check("fraud", params, 3, alarm)
    assert done["job"] == "job-1" and submitted[0][0] == ("python -m training.retrain --model fraud --publish-as "
                                                          "fraud --epochs 2")
    clock[0] = 1051.0 + 601
    assert trigger.check("fraud", params, 3, alarm) is None  # past the cooldown, but the job still runs
    status["job-1"] = "SUCCEEDED"
    clock[0] = 1100.0
    assert trigger.check("fraud", params, 3, alarm) is None and trigger.outcomes[("fraud", "succeeded")] == 1
    assert trigger.check("fraud", params, 3, alarm) is None  # ended, but within the cooldown
    clock[0] = 1051.0 + 601
    assert trigger.check("fraud", params, 3, alarm)["job"] == "job-2"  # after the cooldown
    assert trigger.check("other", {}, 1, alarm) is None  # no trainer known for it: reported once, never submitted
    assert trigger.check("fraud_x", {"fleet.retrain.after_s": "off", "fleet.retrain.model": "fraud"}, 1,
                         alarm) is None
    events = [json.loads(line)["event"] for line in (tmp_path / "audit" / "monitor.jsonl").read_text().splitlines()]
    assert events == ["retrain_submitted", "retrain_succeeded", "retrain_submitted", "retrain_unsupported"]


def test_the_audit_logs_tail_reads_back_whole_records_only(tmp_path):
    from serving.monitoring.alerts import AuditLog

    audit = AuditLog(str(tmp_path))
    assert audit.tail(1 << 20) == []  # nothing written yet
    for n in range(3):
        audit.write({"event": "e", "n": n})
    with open(audit.path, "ab") as f:
        f.write(b'{"event": "cut by a cra')  # a crash in the middle of a line
    assert [r["n"] for r in audit.tail(1 << 20)] == [0, 1, 2]
    last_two = sum(len(line) + 1 for line in open(audit.path, "rb").read().split(b"\n")[1:])
    assert [r["n"] for r in audit.tail(last_two - 5)] == [2]  # the window starts inside record 1: it is skipped
    assert AuditLog(None).tail(1 << 20) == []


def test_a_restarted_monitor_keeps_the_running_job_and_the_cooldown_from_the_audit_log(tmp_path):
    from serving.monitoring.alerts import AuditLog

    clock = [1000.0]
    submitted, status = [], {}

    def submit(entrypoint, metadata):
        submitted.append(entrypoint)
        status[f"job-{len(submitted)}"] = "RUNNING"
        return f"job-{len(submitted)}"

    def lookup(job_id):
        if job_id not in status:
            raise RuntimeError(f"Job {job_id} does not exist")
        return status[job_id]

    def restarted():  # a new monitor process: only the audit log is left of the last one
        return RetrainTrigger(60.0, 600.0, submit, lookup, AuditLog(str(tmp_path)), clock=lambda: clock[0])

    alarm = [{"stream": "f0", "since": 900.0, "version": 3}]
    assert restarted().check("fraud", {}, 3, alarm)["job"] == "job-1"
    clock[0] = 2000.0  # past the cooldown, the job still running: the new monitor follows it, submits nothing
    trigger = restarted()
    assert trigger.jobs["fraud"]["id"] == "job-1" and trigger.check("fraud", {}, 3, alarm) is None
    status["job-1"] = "SUCCEEDED"
    clock[0] = 2100.0  # it ended while no monitor watched: recorded once, by the one that sees it
    assert restarted().check("fraud", {}, 3, alarm)["job"] == "job-2"
    clock[0] = 2200.0
    assert restarted().check("fraud", {}, 3, alarm) is None  # job-2 runs (and is within its cooldown)
    clock[0] = 2800.0  # a job the job server no longer knows (a new cluster) does not block the model forever
    status.clear()
    assert restarted().check("fraud", {}, 3, alarm)["job"] == "job-3"
    events = [json.loads(line) for line in (tmp_path / "audit" / "monitor.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("job")) for e in events] == [
        ("retrain_submitted", "job-1"), ("retrain_succeeded", "job-1"), ("retrain_submitted", "job-2"),
        ("retrain_unknown", "job-2"), ("retrain_submitted", "job-3")]


def test_a_replaced_versions_alarms_clear_once_the_new_version_serves(engine_setup):
    from serving.monitoring.engine import MonitoringEngine

    _, data, repo = engine_setup
    v1 = repo.metadata("m", 1)
    repo.publish("m", {"model.pt": b"v2"}, v1)
    clock = [1000.0]
    engine = MonitoringEngine({"repository": repo.root_uri, "data_dir": str(data), "drift_window_rows": 2000},
                              clock=lambda: clock[0])
    rng = np.random.default_rng(4)
    for _ in range(20):  # version 1 drifts and alarms
        engine.intake("r1", step(rng, 500, shift=0.3))
        engine.tick()
        clock[0] += 1
    assert ("m", 1, "f0") in engine.alarms
    for _ in range(5):  # version 2 takes the traffic (stable); version 1 gets none
        delta = step(rng, 500)
        delta["drift"] = {("m", "2"): delta["drift"][("m", "1")]}
        engine.intake("r1", delta)
        events = engine.tick()
        clock[0] += 1
    assert ("m", 1, "f0") in engine.alarms  # 5 s without rows: not yet
    clock[0] += 10
    events = engine.tick()
    assert [(e["version"], e["stream"], e["state"], e["detector"]) for e in events] == [(1, "f0", "ok", "retired")]
    assert not engine.alarms and "version 2 serves m now" in events[0]["evidence"]["why"]
    engine.close()
