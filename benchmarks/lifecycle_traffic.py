"""The lifecycle scenario's clients: the replayed traffic, the labels fed back, the monitor's reports polled.

- `Sender`: sends the replay's rows to `/v2/models/{m}/infer` open loop at a constant rate
  (request i is due at i / rate; a late answer never delays the next request), `rows_per_request`
  rows each, with the v2 id `lc-<i>`, from a pool of threads over keep-alive connections; it
  records each request's status, answering version and latency. `jump(row)` moves the replay on
  to a later row of the data (the next phase) without a gap in the requests: `data_index[i]` is
  the data request that request i sent.
- `Labeler`: once a second, POSTs to `/v2/models/{m}/feedback` the true labels of every answered
  request due at least `delay_s` ago (one body a second; paused for the AUC checkpoints).
- `Poller`: once a second, GETs `/drift`, `/quality` and `/metrics` (and, given the admin token,
  `/rollout`) and keeps a compact snapshot, and reads the monitor's audit files
  (`<data>/audit/monitor.jsonl`, and `rollout.jsonl`: the rollout controller's decisions) as they grow.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson

from benchmarks.live_cluster import metric_sum

__all__ = ["Sender", "Labeler", "Poller", "compact_drift", "compact_quality", "compact_rollout", "rollout_gates"]


class _Http:
    """One keep-alive connection per thread to host:port."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> dict | None:
        try:
            status, body = self.request("GET", path, headers=headers)
        except (OSError, http.client.HTTPException):
            return None
        return orjson.loads(body) if status == 200 else None


class Sender:
    """Open-loop replay of `x` in requests of `rows_per_request` rows at `rate_rps` (see the module doc)."""

    def __init__(self, url: str, model: str, x: np.ndarray, rows_per_request: int, rate_rps: float,
                 workers: int = 32):
        self.http = _Http(url)
        self.path = f"/v2/models/{model}/infer"
        self.x, self.k, self.rate = x, rows_per_request, rate_rps
        self.n = len(x) // rows_per_request
        self.send_s = np.arange(self.n) / rate_rps  # intended send time of each request, from the start
        self.data_index = np.full(self.n, -1, np.int64)  # the data request each request sent (see `jump`)
        self._offset = 0  # data request of request i: i + offset
        self.status = np.zeros(self.n, np.int16)  # 0: not answered yet; -1: transport error
        self.version = np.zeros(self.n, np.int16)
        self.latency_s = np.full(self.n, np.nan)
        self.done = np.zeros(self.n, bool)
        self.scheduled = 0  # requests handed to the pool
        self.first_seen: dict[int, float] = {}  # version -> first answer by it (s from the start)
        self.last_version: int | None = None
        self.t0 = 0.0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lifecycle-send")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._schedule, name="lifecycle-schedule", daemon=True)
        self._lock = threading.Lock()

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _schedule(self) -> None:
        for i in range(self.n):
            wait = self.t0 + self.send_s[i] - time.time()
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set() or i + self._offset >= self.n:
                return
            self.data_index[i] = i + self._offset
            self._pool.submit(self._one, i)
            self.scheduled = i + 1

    def jump(self, data_row: int) -> None:
        """The next requests send the data from `data_row` on (a multiple of rows_per_request)."""
        self._offset = data_row // self.k - self.scheduled

    def first_request_from(self, data_row: int) -> int | None:
        """The first request that sent data at or after `data_row` (the onset of a phase jumped to)."""
        sent = np.flatnonzero(self.data_index[:self.scheduled] >= data_row // self.k)
        return int(sent[0]) if len(sent) else None

    def rows_of(self, i: int) -> slice:
        d = int(self.data_index[i])
        return slice(d * self.k, (d + 1) * self.k)

    def body(self, i: int) -> bytes:
        part = self.x[self.rows_of(i)]
        return orjson.dumps({"id": f"lc-{i}", "inputs": [{"name": "features", "shape": list(part.shape),
                                                          "datatype": "FP32", "data": part.ravel().tolist()}]})

    def _one(self, i: int) -> None:
        try:
            status, raw = self.http.request("POST", self.path, self.body(i))
        except (OSError, http.client.HTTPException):
            status, raw = -1, b""
        now = time.time() - self.t0
        self.latency_s[i] = now - self.send_s[i]
        if status == 200:
            version = int(orjson.loads(raw).get("model_version", 0))
            self.version[i] = version
            with self._lock:
                self.first_seen.setdefault(version, now)
                self.last_version = version
        self.status[i] = status
        self.done[i] = True

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop scheduling; wait for the requests in flight."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._pool.shutdown(wait=True)

    def rows_sent(self) -> int:
        return self.scheduled * self.k

    def answered_rows(self) -> int:
        return int((self.status[:self.scheduled] == 200).sum()) * self.k


class Labeler:
    """Feeds the replay's true labels back `delay_s` after each request (see the module doc)."""

    def __init__(self, sender: Sender, y: np.ndarray, model: str, delay_s: float, interval_s: float = 1.0):
        self.sender, self.y, self.delay_s, self.interval_s = sender, y, delay_s, interval_s
        self.path = f"/v2/models/{model}/feedback"
        self.next = 0  # the next request to label
        self.posted_labels = 0
        self.posts: list[dict] = []  # {t, first, last, labels, status}
        self._lock = threading.Lock()  # held while a body is built and sent
        self._paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifecycle-labels", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.post(time.time() - self.sender.t0 - self.delay_s)

    def post(self, cutoff_s: float) -> int:
        """Label every answered request due by `cutoff_s` (s from the start) not labelled yet; the labels sent."""
        with self._lock:
            if self._paused:
                return 0
            s, k, first = self.sender, self.sender.k, self.next
            i, items = first, []
            while i < s.scheduled and s.send_s[i] <= cutoff_s and s.done[i]:
                if s.status[i] == 200:
                    items.append({"id": f"lc-{i}", "label": self.y[s.rows_of(i)].tolist()})
                i += 1
            if not items:
                self.next = i
                return 0
            try:
                status, _ = s.http.request("POST", self.path, orjson.dumps({"labels": items}))
            except (OSError, http.client.HTTPException):
                status = -1
            if status != 200:
                # Not accepted: tried again with the next round.
                self.posts.append({"t": round(time.time() - s.t0, 2), "first": first, "last": i - 1, "labels": 0,
                                   "status": status})
                return 0
            self.next = i
            n = len(items) * k
            self.posted_labels += n
            self.posts.append({"t": round(time.time() - s.t0, 2), "first": first, "last": i - 1, "labels": n,
                               "status": status})
            return n

    def pause(self) -> None:
        with self._lock:  # a body being sent is finished first
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def labelled_rows_at(self, t_s: float) -> int:
        """Rows whose labels had been posted by `t_s` (s from the start): the end of the last body sent by then."""
        last = [p["last"] for p in self.posts if p["t"] <= t_s and p["labels"]]
        return (max(last) + 1) * self.sender.k if last else 0


def _ratio(value, threshold) -> float | None:
    if value is None or threshold is None or not threshold or threshold == float("inf"):
        return None
    return round(float(value) / float(threshold), 4)


def compact_drift(doc: dict | None) -> dict:
    """{version: {"rows", "alarming", "streams": {name: [alarm 0/1, PSI/threshold rows window, ... time window,
    max CUSUM / h]}}} from a /drift answer."""
    out = {}
    for version, v in ((doc or {}).get("versions") or {}).items():
        streams = {}
        for s in v.get("streams", []):
            windows = s.get("windows") or {}
            ratios = []
            for name in ("rows", "time"):
                w = windows.get(name) or {}
                ratios.append(_ratio(w.get("psi"), w.get("psi_threshold")) if w.get("judged") else None)
            c = s.get("cusum") or {}
            cusum = max(c.get("up") or 0.0, c.get("down") or 0.0)
            streams[s["name"]] = [1 if s.get("state") == "alarm" else 0, *ratios, _ratio(cusum, c.get("threshold"))]
        out[version] = {"rows": v.get("rows"), "alarming": v.get("alarming", []), "streams": streams}
    return out


def compact_quality(doc: dict | None) -> dict:
    """{"versions": {version: {...}}, "labels": {...}} from a /quality answer: the rows window, the label detector."""
    out: dict = {"versions": {}, "labels": (doc or {}).get("labels")}
    for version, v in ((doc or {}).get("versions") or {}).items():
        rows, label = v.get("rows") or {}, v.get("label_error") or {}
        cusum = label.get("cusum") or {}
        out["versions"][version] = {
            "auc": rows.get("roc_auc"), "error_rate": rows.get("label_error_rate"), "window_rows": rows.get("rows"),
            "labelled": v.get("labelled"), "label_state": label.get("state"),
            "recent_error_rate": label.get("recent_error_rate"), "p0": label.get("p0"),
            "cusum_ratio": _ratio(cusum.get("value"), cusum.get("threshold"))}
    return out


_AUDIT_KEYS = ("event", "time", "alarm", "model", "version", "stream", "state", "detector", "statistic", "value",
               "threshold", "since", "rows", "job", "entrypoint", "status", "duration_s", "error", "why")
_ROLLOUT_KEYS = ("event", "time", "model", "rollout_id", "stable", "candidate", "stage", "version", "weight", "mode",
                 "by", "reason")


def compact_rollout(doc: dict | None) -> dict | None:
    """{"status", "stable", "candidate", "stage", "weight", "decision"} from a /rollout answer (its latest verdict's
    decision; the history is kept apart, `Poller.rollout_history`)."""
    if not doc:
        return None
    return {"status": doc.get("status"), "stable": doc.get("stable"), "candidate": doc.get("candidate"),
            "stage": doc.get("stage"), "weight": doc.get("weight"),
            "decision": (doc.get("evidence") or {}).get("decision")}


def rollout_gates(evidence: dict | None) -> dict:
    """Per gate of a rollout decision's evidence: {"state", "statistic", "threshold", "n"} (n: the stage's evidence)."""
    return {name: {k: gate.get(k) for k in ("state", "statistic", "threshold", "n", "estimate")}
            for name, gate in ((evidence or {}).get("gates") or {}).items()}


class Poller:
    """Snapshots of the monitor's reports every `interval_s` (see the module doc)."""

    def __init__(self, url: str, model: str, data_dir: str, sender: Sender, interval_s: float = 1.0,
                 admin_token: str | None = None):
        self.http = _Http(url)
        self.model, self.sender, self.interval_s = model, sender, interval_s
        self.audit_path = Path(data_dir) / "audit" / "monitor.jsonl"
        self.rollout_path = Path(data_dir) / "audit" / "rollout.jsonl"
        self.admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else None
        self.timeline: list[dict] = []
        self.events: list[dict] = []
        self.rollout_events: list[dict] = []  # the controller's decisions (rollout.jsonl), with per-gate evidence
        self.rollout_history: list[dict] = []  # the latest /rollout answer's history, "at" also as "t"
        self._audit_offset = 0
        self._rollout_offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifecycle-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshot()
            except Exception as exc:  # noqa: BLE001 - a failed poll is a gap in the timeline, not the end
                self.timeline.append({"t": round(time.time() - self.sender.t0, 2), "error": repr(exc)})

    @staticmethod
    def _new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
        """The complete lines appended to `path` since `offset` (a line being appended is read next time)."""
        if not path.exists():
            return [], offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        return [json.loads(line) for line in data[:end].splitlines()], offset + end

    def read_audit(self) -> None:
        records, self._audit_offset = self._new_lines(self.audit_path, self._audit_offset)
        for record in records:
            if record.get("model") not in (None, self.model):
                continue
            kept = {k: record[k] for k in _AUDIT_KEYS if k in record}
            if record.get("event") == "retrain_submitted":
                kept["held_s"] = (record.get("evidence") or {}).get("held_s")
            t0 = self.sender.t0
            kept["t"] = round(record["time"] - t0, 2)
            if record.get("since") is not None:
                kept["since_t"] = round(record["since"] - t0, 2)
            self.events.append(kept)
        records, self._rollout_offset = self._new_lines(self.rollout_path, self._rollout_offset)
        for record in records:
            if record.get("model") != self.model:
                continue
            kept = {k: record[k] for k in _ROLLOUT_KEYS if k in record}
            kept["t"] = round(record["time"] - self.sender.t0, 2)
            if record.get("evidence"):
                kept["gates"] = rollout_gates(record["evidence"])
                kept["decision_reason"] = record["evidence"].get("reason")
            if record.get("arms"):
                kept["arms"] = record["arms"]
            self.rollout_events.append(kept)

    def snapshot(self) -> dict:
        m = self.model
        drift = self.http.get_json(f"/v2/models/{m}/drift")
        quality = self.http.get_json(f"/v2/models/{m}/quality")
        try:
            status, raw = self.http.request("GET", "/metrics")
            metrics = raw.decode() if status == 200 else ""
        except (OSError, http.client.HTTPException):
            metrics = ""
        rollout = self.http.get_json(f"/v2/models/{m}/rollout", self.admin) if self.admin else None
        self.read_audit()
        t0 = self.sender.t0
        if rollout and rollout.get("history"):
            self.rollout_history = [{**h, "t": round(h["at"] - t0, 2)} for h in rollout["history"]]
        snap = {"t": round(time.time() - t0, 2), "rows_sent": self.sender.rows_sent(),
                "serving_version": self.sender.last_version, "rollout": compact_rollout(rollout),
                "drift": compact_drift(drift),
                "quality": compact_quality(quality),
                "metrics": {"log_rows": metric_sum(metrics, "fleet_prediction_log_rows_total", model=m),
                            "log_dropped": metric_sum(metrics, "fleet_prediction_log_dropped_total", model=m),
                            "log_buffered": metric_sum(metrics, "fleet_prediction_log_buffered_rows"),
                            "monitor_cpu_s": metric_sum(metrics, "fleet_monitor_cpu_seconds_total")}}
        self.timeline.append(snap)
        return snap

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.read_audit()
