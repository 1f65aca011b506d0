"""The lifecycle scenario's clients: the replayed traffic, the labels fed back, the monitor's reports polled.

- `Sender`: sends the replay's rows to `/v2/models/{m}/infer` open loop at a constant rate
  (request i is due at i / rate; a late answer never delays the next request), `rows_per_request`
  rows each, with the v2 id `lc-<i>`, from a pool of threads over keep-alive connections; it
  records each request's status, answering version and latency.
- `Labeler`: once a second, POSTs to `/v2/models/{m}/feedback` the true labels of every answered
  request due at least `delay_s` ago (one body a second; paused for the AUC checkpoints).
- `Poller`: once a second, GETs `/drift`, `/quality` and `/metrics` and keeps a compact
  snapshot, and reads the monitor's audit file (`<data>/audit/monitor.jsonl`) as it grows.
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

__all__ = ["Sender", "Labeler", "Poller", "compact_drift", "compact_quality"]


class _Http:
    """One keep-alive connection per thread to host:port."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s
        self._local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def get_json(self, path: str) -> dict | None:
        try:
            status, body = self.request("GET", path)
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
            if self._stop.is_set():
                return
            self._pool.submit(self._one, i)
            self.scheduled = i + 1

    def body(self, i: int) -> bytes:
        part = self.x[i * self.k:(i + 1) * self.k]
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
                    items.append({"id": f"lc-{i}", "label": self.y[i * k:(i + 1) * k].tolist()})
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


class Poller:
    """Snapshots of the monitor's reports every `interval_s` (see the module doc)."""

    def __init__(self, url: str, model: str, data_dir: str, sender: Sender, interval_s: float = 1.0):
        self.http = _Http(url)
        self.model, self.sender, self.interval_s = model, sender, interval_s
        self.audit_path = Path(data_dir) / "audit" / "monitor.jsonl"
        self.timeline: list[dict] = []
        self.events: list[dict] = []
        self._audit_offset = 0
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

    def read_audit(self) -> None:
        if not self.audit_path.exists():
            return
        with open(self.audit_path, "rb") as f:
            f.seek(self._audit_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being appended is read next time
        self._audit_offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
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

    def snapshot(self) -> dict:
        m = self.model
        drift = self.http.get_json(f"/v2/models/{m}/drift")
        quality = self.http.get_json(f"/v2/models/{m}/quality")
        try:
            status, raw = self.http.request("GET", "/metrics")
            metrics = raw.decode() if status == 200 else ""
        except (OSError, http.client.HTTPException):
            metrics = ""
        self.read_audit()
        snap = {"t": round(time.time() - self.sender.t0, 2), "rows_sent": self.sender.rows_sent(),
                "serving_version": self.sender.last_version, "drift": compact_drift(drift),
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
