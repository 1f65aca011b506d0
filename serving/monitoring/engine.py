"""The monitor's judgement: drift steps, the label join, online quality, alarms, alerts and retraining.

Plain Python (unit-tested without Ray); `serving.monitoring.actor` runs it inside the monitor
actor. Ingress replicas hand it their monitoring deltas about once a second (`intake`): drift
counts per version, prediction-log and feedback counters, input-contract violations. `tick`
(every `monitor_interval_s`) turns the counts accumulated since the last tick into one drift
step per version, joins new labels to their predictions, feeds online quality and the label-error
detector, and acts on the alarms that changed: the audit file, the webhook, the retrain trigger.
The drift arithmetic runs here over merged window histograms, never per request.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from serving.errors import FleetError
from serving.monitoring.alerts import AuditLog, WebhookSender
from serving.monitoring.drift import DriftConfig, LabelConfig, LabelErrorDetector, StreamReference, VersionDrift
from serving.monitoring.feedback import labels_spec
from serving.monitoring.join import REMOTE_LIST_INTERVAL_S, JoinCounts, ModelJoin
from serving.monitoring.quality import QualityWindow
from serving.monitoring.rank import RankDetector
from serving.monitoring.reference import label_errors
from serving.monitoring.retrain import RetrainTrigger
from serving.registry import ModelRepository
from serving.storage import Location, locate

__all__ = ["MonitoringEngine", "VersionMonitor"]

_log = logging.getLogger("fleet.monitor")
_STREAM_KEYS = ("features", "score", "pca")
_QUALITY_EVERY_S = 1.0
_RETIRE_AFTER_S = 10.0  # a replaced version's alarms clear once it got no rows this long


@dataclass
class VersionMonitor:
    """Everything the monitor keeps about one model version."""

    model: str
    version: int
    metadata: dict
    drift: VersionDrift | None = None
    drift_keys: tuple[str, ...] = ()  # which count arrays the drift streams are made of, in order
    quality: QualityWindow | None = None
    labels: LabelErrorDetector | None = None
    rank: RankDetector | None = None  # a binary classifier's ranking of labelled scores
    pending: dict = field(default_factory=dict)  # counts since the last step: key -> int64 array
    pending_rows: int = 0
    rows: int = 0
    first_seen_s: float | None = None  # when its first rows reached the monitor
    last_seen_s: float = 0.0


def _references(metadata: dict, keys: tuple[str, ...]) -> list[StreamReference]:
    """The drift streams a version's metadata describes, for the count arrays `keys` the replicas send."""
    refs: list[StreamReference] = []
    if "features" in keys:
        stats = metadata.get("reference_stats") or {}
        for name in metadata.get("feature_names") or []:
            entry = stats.get(name) or {}
            refs.append(StreamReference(name, "feature", np.asarray(entry["counts"], np.int64),
                                        np.asarray(entry.get("edges"), np.float64) if entry.get("edges") else None))
    monitoring = metadata.get("monitoring") or {}
    for key in ("score", "pca"):
        if key in keys:
            entry = monitoring[key if key == "pca" else "scores"]
            refs.append(StreamReference(key, key, np.asarray(entry["counts"], np.int64),
                                        np.asarray(entry["edges"], np.float64)))
    return refs


class MonitoringEngine:
    """Cluster-wide monitoring state (see the module doc). `options`: the ServingOptions fields as a dict."""

    def __init__(self, options: dict, *, submit=None, status=None, clock=time.time):
        self.options = options
        self._clock = clock
        self.repository = ModelRepository(options["repository"])
        self.data_dir = options.get("data_dir")
        self.drift_config = DriftConfig(false_alarm_rows=float(options.get("drift_false_alarm_rows", 864e6)),
                                        window_rows=int(options.get("drift_window_rows", 10_000)),
                                        window_s=float(options.get("drift_window_s", 300.0)))
        self.label_config = LabelConfig()
        self.versions: dict[tuple[str, int], VersionMonitor] = {}
        self.joins: dict[str, ModelJoin] = {}
        self.tasks: dict[str, object] = {}  # model -> LabelSpec
        self.alarms: dict[tuple[str, int, str], dict] = {}  # active alarms
        self.counters: dict[str, dict] = {"log_written": {}, "log_dropped": {}, "log_cpu": {}, "grpc_transport": {},
                                          "feedback_labels": {}, "feedback_duplicates": {}, "violations": {}}
        self.log_buffered: dict[str, int] = {}  # replica -> rows buffered now
        self.rollout_labels: dict[tuple[str, int], list[int]] = {}  # joined since taken: [labelled, wrong]
        self.rollout_pairs: dict[tuple[str, int, int], list[int]] = {}  # see take_rollout_labels
        self.audit = AuditLog(self.data_dir, audit_dir=options.get("audit_dir"))
        url = options.get("alert_webhook_url")
        self.webhook = WebhookSender(url, options.get("alert_webhook_token_file")) if url else None
        self.retrain = RetrainTrigger(options.get("retrain_after_s"), float(options.get("retrain_cooldown_s", 0.0)),
                                      submit, status, self.audit, clock)
        self._last_quality = 0.0
        self._labels: Location | None = None  # the data folder, opened at the first join
        self._label_models: tuple[float, list[str]] = (-float("inf"), [])  # (listed at, models with labels)
        self.lock = threading.RLock()
        self.tick_seconds = 0.0  # CPU-bound time spent in tick(), cumulative
        self.ticks = 0

    # -- intake (from the replicas' pushes) ---------------------------------------------------
    def _bump(self, name: str, key, n: int) -> None:
        table = self.counters[name]
        table[key] = table.get(key, 0) + n

    def intake(self, replica: str, delta: dict | None) -> None:
        if not delta:
            return
        now = self._clock()
        with self.lock:
            for (model, version), entry in delta.get("drift", {}).items():
                vm = self._version(model, int(version))
                if vm is None:
                    continue
                vm.last_seen_s = now
                if vm.first_seen_s is None:
                    vm.first_seen_s = now
                vm.pending_rows += int(entry.get("rows", 0))
                for key in _STREAM_KEYS:
                    if key in entry:
                        arr = np.asarray(entry[key], np.int64)
                        mine = vm.pending.get(key)
                        vm.pending[key] = arr if mine is None or mine.shape != arr.shape else mine + arr
            for model, entry in delta.get("log", {}).items():
                # Both counters of a model start together (at 0): Prometheus's increase() sees its first drop.
                self._bump("log_written", model, int(entry.get("written", 0)))
                self._bump("log_dropped", model, int(entry.get("dropped", 0)))
                for part in ("writer", "request_path"):
                    self._bump("log_cpu", (model, part), int(entry.get(f"{part}_ns", 0)))
            for event, n in (delta.get("grpc") or {}).items():
                self._bump("grpc_transport", event, int(n))
            for model, entry in delta.get("feedback", {}).items():
                self._bump("feedback_labels", model, int(entry.get("labels", 0)))
                self._bump("feedback_duplicates", model, int(entry.get("duplicates", 0)))
            for key, n in delta.get("violations", {}).items():
                self._bump("violations", tuple(key), int(n))
            if "log_buffered" in delta:
                self.log_buffered[replica] = int(delta["log_buffered"])

    def _version(self, model: str, version: int) -> VersionMonitor | None:
        key = (model, version)
        vm = self.versions.get(key)
        if vm is None:
            try:
                metadata = self.repository.metadata(model, version)
            except (FleetError, OSError) as exc:
                _log.warning("model %s version %s: cannot read its metadata (%s): not monitored", model, version, exc)
                metadata = {}
            vm = self.versions[key] = VersionMonitor(model, version, metadata)
        return vm

    # -- the periodic judgement -------------------------------------------------------------
    def tick(self) -> list[dict]:
        """One round: a drift step per version with new rows, the label join, alarms acted on. Returns the events."""
        started = time.thread_time()  # this thread's CPU only: not the actor's other threads meanwhile
        now = self._clock()
        events: list[dict] = []
        with self.lock:
            for vm in list(self.versions.values()):
                events += self._drift_step(vm, now)
            events += self._retire_replaced(now)
            if now - self._last_quality >= _QUALITY_EVERY_S:
                self._last_quality = now
                events += self._join_all(now)
            for event in events:
                self._act(event)
            self._retrain(now)
            self.ticks += 1
        self.tick_seconds += time.thread_time() - started
        return events

    def _drift_step(self, vm: VersionMonitor, now: float) -> list[dict]:
        if not vm.pending_rows:
            return []
        keys = tuple(k for k in _STREAM_KEYS if k in vm.pending)
        if vm.drift is None or vm.drift_keys != keys:
            try:
                refs = _references(vm.metadata, keys)
                vm.drift = VersionDrift(refs, self.drift_config) if refs else None
            except (KeyError, TypeError, ValueError) as exc:
                _log.warning("model %s version %s: no usable drift reference (%s)", vm.model, vm.version, exc)
                vm.drift = None
            vm.drift_keys = keys
        pending, rows = vm.pending, vm.pending_rows
        vm.pending, vm.pending_rows = {}, 0
        vm.rows += rows
        if vm.drift is None:
            return []
        counts = [row for key in keys for row in np.asarray(pending[key], np.int64)]
        try:
            events = vm.drift.add(counts, rows, now)
        except ValueError as exc:  # counts of another shape (a republished reference): start afresh
            _log.warning("model %s version %s: drift counts do not fit the reference (%s); restarting", vm.model,
                         vm.version, exc)
            vm.drift = None
            return []
        return [{**e, "model": vm.model, "version": vm.version, "alarm": "drift"} for e in events]

    def _retire_replaced(self, now: float) -> list[dict]:
        """Clear the alarms of versions a newer version of their model has replaced: no rows for _RETIRE_AFTER_S
        since the newer one's first rows (their alarms could never clear otherwise)."""
        events: list[dict] = []
        for (model, version), vm in self.versions.items():
            if vm.first_seen_s is None or now - vm.last_seen_s < _RETIRE_AFTER_S:
                continue
            newer = [o for (m, v), o in self.versions.items() if m == model and v > version
                     and o.first_seen_s is not None and o.first_seen_s >= vm.last_seen_s - _RETIRE_AFTER_S]
            if not newer:
                continue
            why = f"version {newer[0].version} serves {model} now; this one got no rows for {now - vm.last_seen_s:.0f} s"
            for detector in (vm.drift, vm.labels, vm.rank):
                if detector is not None:
                    events += [{**e, "model": model, "version": version, "alarm": "drift" if detector is vm.drift
                                else "quality"} for e in detector.retire(now, why)]
        return events

    def _label_spec(self, model: str):
        spec = self.tasks.get(model)
        if spec is None:
            spec = self.tasks[model] = labels_spec(self.repository.spec(model))
        return spec

    def _models_with_labels(self) -> list[str]:
        if not self.data_dir:
            return []
        if self._labels is None:
            self._labels = locate(self.data_dir)
        now = time.monotonic()
        if self._labels.local or now - self._label_models[0] >= REMOTE_LIST_INTERVAL_S:  # a listing costs there
            try:
                infos = self._labels.fs.get_file_info(pafs.FileSelector(self._labels.sub("labels"),
                                                                        allow_not_found=True))
            except OSError as exc:
                _log.warning("cannot list the labels folder of %s: %s", self.data_dir, exc)
                return self._label_models[1]
            self._label_models = (now, sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                                              and not i.base_name.startswith((".", "_"))))
        return self._label_models[1]

    def _join_all(self, now: float) -> list[dict]:
        events: list[dict] = []
        for model in self._models_with_labels():
            try:
                events += self._join(model, now)
            except Exception as exc:  # noqa: BLE001 - one model's broken files must not stop the others
                _log.exception("model %s: joining labels failed: %s", model, exc)
        return events

    def _output_name(self, model: str) -> str:
        spec = self.repository.spec(model)
        return spec.outputs[0].name

    def _join(self, model: str, now: float) -> list[dict]:
        join = self.joins.get(model)
        if join is None:
            if model not in self.repository.list_models():
                return []
            join = self.joins[model] = ModelJoin(
                self.data_dir, model, [self._output_name(model)],
                label_window_days=float(self.options.get("label_window_days", 14.0)))
        joined = join.scan(now)
        if joined is None or joined.num_rows == 0:
            return []
        spec = self._label_spec(model)
        output = join.outputs[0]
        events: list[dict] = []
        judged: list[pa.Table] = []  # (request_id, row, version, wrong) of this scan, for the rollout's pairs
        versions = joined["version"].to_numpy()
        order = np.argsort(joined["timestamp"].cast("int64").to_numpy(), kind="stable")
        for version in np.unique(versions):
            take = order[versions[order] == version]
            part = joined.take(take)
            vm = self._version(model, int(version))
            column = part[output]
            outputs = (np.asarray(column.to_numpy(zero_copy_only=False), np.float64) if spec.task != "multiclass"
                       else np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float64))
            labels = part["label"].to_numpy()
            stamps = part["timestamp"].cast("int64").to_numpy()
            if vm.quality is None:
                vm.quality = QualityWindow(spec.task, window_labels=int(self.options.get("quality_window_labels",
                                                                                           10_000)),
                                           window_s=float(self.options.get("quality_window_s", 3600.0)),
                                           threshold=self._threshold(vm))
            vm.quality.add(stamps, outputs, labels)
            if spec.task == "regression":
                continue
            if vm.labels is None:
                reference = (vm.metadata.get("monitoring") or {}).get("label_error") or {}
                rate, rows = reference.get("rate"), int(reference.get("rows") or 0)
                vm.labels = LabelErrorDetector(rate if rate is not None and rows > 0 else None, max(rows, 1),
                                               self.label_config)
            errors = label_errors(outputs.reshape(len(labels), -1), labels, self._threshold(vm))
            counts = self.rollout_labels.setdefault((model, int(version)), [0, 0])
            counts[0] += len(errors)
            counts[1] += int(np.count_nonzero(errors))
            judged.append(pa.table({"request_id": part["request_id"], "row": part["row"],
                                    "version": pa.array(np.full(len(errors), int(version), np.int64)),
                                    "wrong": pa.array(errors)}))
            events += [{**e, "model": model, "version": int(version), "alarm": "quality"}
                       for e in vm.labels.add(errors, now)]
            if spec.task == "binary":
                rank = self._rank(vm)
                if rank is not None:
                    events += [{**e, "model": model, "version": int(version), "alarm": "quality"}
                               for e in rank.add(outputs, labels, now)]
        if len(judged) > 1:
            self._pairs(model, pa.concat_tables(judged))
        return events

    def _pairs(self, model: str, judged: pa.Table) -> None:
        """Count the labelled requests two versions both answered (a stable version and its shadow candidate):
        per pair of versions (a < b), those only a got right and those only b got right."""
        numbers = sorted(set(judged["version"].to_pylist()))
        for i, a in enumerate(numbers):
            left = judged.filter(pc.equal(judged["version"], a)).select(["request_id", "row", "wrong"])
            for b in numbers[i + 1:]:
                right = judged.filter(pc.equal(judged["version"], b)).select(["request_id", "row", "wrong"])
                both = left.join(right, keys=["request_id", "row"], right_suffix="_b", join_type="inner",
                                  use_threads=False)  # a threaded Acero join segfaulted here (pyarrow 26.0.1)
                if both.num_rows == 0:
                    continue
                wrong_a = both["wrong"].to_numpy(zero_copy_only=False)
                wrong_b = both["wrong_b"].to_numpy(zero_copy_only=False)
                counts = self.rollout_pairs.setdefault((model, a, b), [0, 0, 0])
                counts[0] += int(np.count_nonzero(~wrong_a & wrong_b))  # only a right
                counts[1] += int(np.count_nonzero(wrong_a & ~wrong_b))  # only b right
                counts[2] += both.num_rows

    def input_alarms(self, model: str, version: int) -> list[str]:
        """The version's input streams (features, pca) whose drift alarm holds now, for the rollout's input gate."""
        with self.lock:
            return sorted(stream for (m, v, stream), a in self.alarms.items()
                          if m == model and v == version and a.get("alarm") == "drift" and stream != "score")

    def take_rollout_labels(self) -> dict:
        """What the label join found since the last call, for the rollout judge: {"versions": {(model, version):
        [labelled, wrong]}, "pairs": {(model, a, b): [only a right, only b right, pairs]}}."""
        with self.lock:
            out = {"versions": self.rollout_labels, "pairs": self.rollout_pairs}
            self.rollout_labels, self.rollout_pairs = {}, {}
        return out

    def _rank(self, vm: VersionMonitor) -> RankDetector | None:
        if vm.rank is None:
            monitoring = vm.metadata.get("monitoring") or {}
            by_label = monitoring.get("scores_by_label")
            if not by_label:
                return None
            try:
                vm.rank = RankDetector(by_label, false_alarm_labels=self.label_config.false_alarm_labels)
            except (KeyError, TypeError, ValueError) as exc:
                _log.warning("model %s version %s: no ranking detector (%s)", vm.model, vm.version, exc)
                vm.metadata.setdefault("monitoring", {}).pop("scores_by_label", None)
                return None
        return vm.rank

    @staticmethod
    def _threshold(vm: VersionMonitor) -> float:
        reference = (vm.metadata.get("monitoring") or {}).get("label_error") or {}
        return float(reference.get("threshold", 0.5))

    def _act(self, event: dict) -> None:
        key = (event["model"], event["version"], event["stream"])
        record = {k: event[k] for k in ("alarm", "model", "version", "stream", "state", "detector", "statistic",
                                        "value", "threshold", "since", "rows")}
        if event["state"] == "alarm":
            self.alarms[key] = record
        else:
            self.alarms.pop(key, None)
        self.audit.write({"event": "alarm" if event["state"] == "alarm" else "alarm_cleared", **record,
                          "evidence": event.get("evidence")})
        if self.webhook is not None:
            self.webhook.send({**record, "evidence": event.get("evidence"),
                               "drift_url": f"/v2/models/{event['model']}/versions/{event['version']}/drift"})
        _log.warning("model %s version %s: %s %s on %s (%s %s = %s, threshold %s)", event["model"],
                     event["version"], event["alarm"], event["state"], event["stream"], event["detector"],
                     event["statistic"], event["value"], event["threshold"])

    def _retrain(self, now: float) -> None:
        if not self.retrain.enabled:
            return
        by_model: dict[str, list[dict]] = {}
        for (model, version, _stream), alarm in self.alarms.items():
            by_model.setdefault(model, []).append(alarm)
        for model in set(by_model) | set(self.retrain.jobs):
            try:
                served = self.repository.served_versions(model)
                spec = self.repository.spec(model)
            except (FleetError, OSError):
                continue
            if not served:
                continue
            serving = served[-1]
            alarms = [a for a in by_model.get(model, []) if a["version"] == serving]
            self.retrain.check(model, spec.parameters, serving, alarms)

    # -- reports ----------------------------------------------------------------------------
    def report(self, kind: str, model: str, version: str | None) -> dict:
        now = self._clock()
        with self.lock:
            chosen = {v: vm for (m, v), vm in sorted(self.versions.items())
                      if m == model and (version is None or str(v) == str(version))}
            if kind == "drift":
                versions = {}
                for v, vm in chosen.items():
                    doc = vm.drift.report(now) if vm.drift is not None else {
                        "streams": [], "alarming": [], "rows": vm.rows,
                        "note": "no drift reference: the version's metadata.json has no reference_stats histograms "
                                "nor monitoring entry"}
                    doc["label_error"] = vm.labels.report(now) if vm.labels is not None else None
                    doc["label_rank"] = vm.rank.report(now) if vm.rank is not None else None
                    doc["alarms"] = [a for (m, ver, _s), a in self.alarms.items() if m == model and ver == v]
                    versions[str(v)] = doc
                return {"model_name": model, "versions": versions}
            versions = {}
            for v, vm in chosen.items():
                if vm.quality is None and vm.labels is None:
                    continue
                reference = dict((vm.metadata.get("monitoring") or {}).get("label_error") or {})
                metrics = vm.metadata.get("metrics") or {}
                reference.update(roc_auc=metrics.get("roc_auc"), accuracy=metrics.get("accuracy"))
                versions[str(v)] = {**(vm.quality.report(now) if vm.quality is not None else {}),
                                    "label_error": vm.labels.report(now) if vm.labels is not None else None,
                                    "label_rank": vm.rank.report(now) if vm.rank is not None else None,
                                    "reference": reference}
            join = self.joins.get(model)
            c = join.counts if join is not None else JoinCounts()
            labels = {"read": c.labels, "duplicates": c.duplicates, "joined": c.joined, "pending": c.pending,
                      "unmatched": c.unmatched, "disk_lookups": c.disk_lookups,
                      "unreadable_files": len(c.files_failed)}
            return {"model_name": model, "versions": versions, "labels": labels}

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()
