"""The monitoring metrics in `/metrics` (a prometheus_client collector over `MonitoringEngine`).

Gauges of the latest drift step and quality windows, alarm states as 0/1, and counters of the
prediction log, feedback, input contracts and retrains. Names, as the shipped alert rules
(`cluster/alerts/fleet-rules.yml`) use them:

    fleet_drift_alarm{model,version,stream}                 1 while the stream's drift alarm holds
    fleet_drift_psi{model,version,stream,window}            PSI of the rows / time window
    fleet_drift_psi_threshold{model,version,stream,window}  its calibrated threshold
    fleet_drift_js_distance{...}, fleet_drift_js_distance_threshold{...}
    fleet_drift_cusum{model,version,stream,side}            the ridit CUSUMs (up, down) ...
    fleet_drift_cusum_threshold{model,version,stream}       ... and their threshold h
    fleet_drift_rows_total{model,version}                   rows the drift monitor has judged
    fleet_quality_alarm{model,version,detector}             1 while the label-error (detector label_error) or the
                                                            ranking (label_rank) alarm holds
    fleet_quality_{roc_auc,accuracy,label_error_rate,calibration_error,labelled_rows}{model,version,window}
    fleet_quality_reference_{roc_auc,label_error_rate}{model,version}
    fleet_quality_label_cusum{model,version}, fleet_quality_label_cusum_threshold{model,version}
    fleet_prediction_log_rows_total{model}, fleet_prediction_log_dropped_total{model}
    fleet_prediction_log_buffered_rows                      rows the replicas hold, not yet written
    fleet_prediction_log_cpu_seconds_total{model,part}      the log's own time: part writer, request_path
    fleet_grpc_transport_events_total{event}                the native gRPC transport's refusals and losses
    fleet_feedback_labels_total{model}, fleet_feedback_duplicates_total{model},
    fleet_feedback_joined_total{model}, fleet_feedback_unmatched_total{model}, fleet_feedback_pending_labels{model}
    fleet_input_violations_total{model,feature,rule}
    fleet_retrain_jobs_total{model,outcome}
    fleet_alert_webhook_total{outcome}
    fleet_monitor_cpu_seconds_total                         CPU time the monitor's judgement took
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["MonitoringCollector"]

_MV = ["model", "version"]


def _num(value) -> float | None:
    return None if value is None else float(value)


class MonitoringCollector:
    """prometheus_client custom collector of a `MonitoringEngine`."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        with engine.lock:
            yield from self._drift(engine)
            yield from self._quality(engine)
            yield from self._counters(engine)

    def _drift(self, engine):
        alarm = GaugeMetricFamily("fleet_drift_alarm", "1 while a drift alarm holds on the stream (a feature, the "
                                  "model's score, or pca: the multivariate reconstruction error)", labels=_MV + ["stream"])
        fams = {name: GaugeMetricFamily(f"fleet_drift_{name}", doc, labels=_MV + ["stream", "window"]) for name, doc in (
            ("psi", "Population stability index of the stream's window against the version's reference"),
            ("psi_threshold", "The PSI above which the window is a calibrated alarm (from its size and the "
                              "false-alarm target)"),
            ("js_distance", "Jensen-Shannon distance (natural log) of the window against the reference"),
            ("js_distance_threshold", "The JS distance above which the window is a calibrated alarm"),
        )}
        cusum = GaugeMetricFamily("fleet_drift_cusum", "The stream's ridit CUSUM (nats; alarm at its threshold)",
                                  labels=_MV + ["stream", "side"])
        cusum_h = GaugeMetricFamily("fleet_drift_cusum_threshold", "The CUSUMs' alarm threshold h (nats)",
                                    labels=_MV + ["stream"])
        rows = CounterMetricFamily("fleet_drift_rows", "Rows the drift monitor has judged", labels=_MV)
        for (model, version), vm in sorted(engine.versions.items()):
            v = str(version)
            rows.add_metric([model, v], vm.rows)
            if vm.drift is None:
                continue
            report = vm.drift.report(engine._clock())
            for stream in report["streams"]:
                labels = [model, v, stream["name"]]
                alarm.add_metric(labels, 1.0 if stream["state"] == "alarm" else 0.0)
                for window, doc in (stream.get("windows") or {}).items():
                    for name, key in (("psi", "psi"), ("psi_threshold", "psi_threshold"),
                                      ("js_distance", "js_distance"), ("js_distance_threshold", "js_threshold")):
                        value = _num(doc.get(key))
                        if value is not None and value != float("inf"):
                            fams[name].add_metric(labels + [window], value)
                c = stream.get("cusum") or {}
                for side in ("up", "down"):
                    value = c.get(side)
                    value = value.get("value") if isinstance(value, dict) else value
                    if value is not None:
                        cusum.add_metric(labels + [side], float(value))
                if c.get("threshold") is not None:
                    cusum_h.add_metric(labels, float(c["threshold"]))
        yield alarm
        yield from fams.values()
        yield cusum
        yield cusum_h
        yield rows

    def _quality(self, engine):
        names = {"roc_auc": "ROC AUC of the labelled predictions in the window",
                 "accuracy": "Accuracy of the labelled predictions in the window",
                 "label_error_rate": "Share of labelled predictions in the window that were wrong",
                 "calibration_error": "Expected calibration error (10 bins) of the window",
                 "labelled_rows": "Labelled predictions in the window"}
        fams = {n: GaugeMetricFamily(f"fleet_quality_{n}", doc, labels=_MV + ["window"]) for n, doc in names.items()}
        alarm = GaugeMetricFamily("fleet_quality_alarm", "1 while a quality detector's alarm holds: more label errors "
                                  "(label_error), or positives scoring lower / negatives higher (label_rank)",
                                  labels=_MV + ["detector"])
        ref_auc = GaugeMetricFamily("fleet_quality_reference_roc_auc", "The version's held-out ROC AUC at training",
                                    labels=_MV)
        ref_err = GaugeMetricFamily("fleet_quality_reference_label_error_rate",
                                    "The version's held-out error rate at training", labels=_MV)
        cusum = GaugeMetricFamily("fleet_quality_label_cusum", "The label-error CUSUM (nats)", labels=_MV)
        cusum_h = GaugeMetricFamily("fleet_quality_label_cusum_threshold", "Its alarm threshold (nats)", labels=_MV)
        now = engine._clock()
        for (model, version), vm in sorted(engine.versions.items()):
            labels = [model, str(version)]
            if vm.quality is not None:
                report = vm.quality.report(now)
                for window in ("rows", "time"):
                    doc = report[window]
                    for name in names:
                        value = doc.get("rows") if name == "labelled_rows" else doc.get(name)
                        if value is not None:
                            fams[name].add_metric(labels + [window], float(value))
            if vm.rank is not None:
                alarm.add_metric(labels + ["label_rank"], 1.0 if vm.rank.state == "alarm" else 0.0)
            if vm.labels is not None:
                alarm.add_metric(labels + ["label_error"], 1.0 if vm.labels.state == "alarm" else 0.0)
                r = vm.labels.report(now)
                if r["cusum"]["value"] is not None:
                    cusum.add_metric(labels, r["cusum"]["value"])
                cusum_h.add_metric(labels, r["cusum"]["threshold"])
            metrics = vm.metadata.get("metrics") or {}
            if metrics.get("roc_auc") is not None:
                ref_auc.add_metric(labels, float(metrics["roc_auc"]))
            err = ((vm.metadata.get("monitoring") or {}).get("label_error") or {}).get("rate")
            if err is not None:
                ref_err.add_metric(labels, float(err))
        yield from fams.values()
        yield alarm
        yield ref_auc
        yield ref_err
        yield cusum
        yield cusum_h

    def _counters(self, engine):
        c = engine.counters

        def per_model(name, doc, table):
            fam = CounterMetricFamily(name, doc, labels=["model"])
            for model, n in sorted(table.items()):
                fam.add_metric([model], n)
            return fam

        yield per_model("fleet_prediction_log_rows", "Prediction-log rows written to Parquet", c["log_written"])
        yield per_model("fleet_prediction_log_dropped", "Prediction-log rows dropped (the sink was too slow or "
                        "failing and the replica's buffer was full)", c["log_dropped"])
        grpc_events = CounterMetricFamily("fleet_grpc_transport_events", "What the native gRPC transport refused or "
                                          "lost: connections refused (over max_connections) or failed (protocol "
                                          "errors), calls refused, calls the client cancelled, answers to calls "
                                          "already gone", labels=["event"])
        for event, n in sorted(c["grpc_transport"].items()):
            grpc_events.add_metric([event], n)
        yield grpc_events
        cpu = CounterMetricFamily("fleet_prediction_log_cpu_seconds", "Time the prediction log took: part "
                                  "\"writer\", the writer threads' CPU time building and writing Parquet; part "
                                  "\"request_path\", the request path handing answered batches over",
                                  labels=["model", "part"])
        for (model, part), ns in sorted(c["log_cpu"].items()):
            cpu.add_metric([model, part], ns / 1e9)
        yield cpu
        buffered = GaugeMetricFamily("fleet_prediction_log_buffered_rows", "Prediction-log rows the ingress "
                                     "replicas hold, not yet written")
        buffered.add_metric([], sum(engine.log_buffered.values()))
        yield buffered
        yield per_model("fleet_feedback_labels", "Labels accepted at /feedback", c["feedback_labels"])
        yield per_model("fleet_feedback_duplicates", "Labels that repeated an (id, row) of the same body (the last "
                        "won)", c["feedback_duplicates"])
        joined = CounterMetricFamily("fleet_feedback_joined", "Labels joined to their prediction", labels=["model"])
        unmatched = CounterMetricFamily("fleet_feedback_unmatched", "Labels whose prediction was not found within "
                                        "label_window_days", labels=["model"])
        pending = GaugeMetricFamily("fleet_feedback_pending_labels", "Labels waiting for their prediction",
                                    labels=["model"])
        for model, join in sorted(engine.joins.items()):
            joined.add_metric([model], join.counts.joined)
            unmatched.add_metric([model], join.counts.unmatched)
            pending.add_metric([model], join.counts.pending)
        yield joined
        yield unmatched
        yield pending
        violations = CounterMetricFamily("fleet_input_violations", "Rows that broke an input contract rule",
                                         labels=["model", "feature", "rule"])
        for (model, feature, rule), n in sorted(c["violations"].items()):
            violations.add_metric([model, feature, rule], n)
        yield violations
        retrain = CounterMetricFamily("fleet_retrain_jobs", "Retrain jobs the monitor submitted, and how they ended",
                                      labels=["model", "outcome"])
        for (model, outcome), n in sorted(engine.retrain.outcomes.items()):
            retrain.add_metric([model, outcome], n)
        yield retrain
        webhook = CounterMetricFamily("fleet_alert_webhook", "Alarm events sent to the webhook, by outcome",
                                      labels=["outcome"])
        if engine.webhook is not None:
            for outcome in ("sent", "failed", "dropped"):
                webhook.add_metric([outcome], engine.webhook.counts.get(outcome, 0))
        yield webhook
        cpu = CounterMetricFamily("fleet_monitor_cpu_seconds", "CPU time the monitor's judgement (drift steps, "
                                  "label join, quality) took")
        cpu.add_metric([], engine.tick_seconds)
        yield cpu
