"""Where the monitor's alarms go besides `/metrics`: an audit file and, optionally, a webhook.

- Audit: every alarm raised or cleared and every retrain decision is one JSON line appended to
  `<data>/audit/monitor.jsonl` (with its evidence), so what the monitor did survives it. An object
  store cannot append: with the data folder on one (an s3:// URI), the audit files go to a local
  folder instead, `<state_dir>/audit` by default (`audit_dir_for`), on the node the writer runs on.
- Webhook (`alert_webhook_url`): each alarm event is POSTed as JSON by a sender thread, off the
  monitor's loop: at most `max_queue` events wait (the oldest is dropped first, counted), each is
  tried 3 times with a growing pause, 5 s each. A bearer token, when the receiver wants one, is
  read from `alert_webhook_token_file` at send time: it is in no config, state file or environment.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from serving.storage import is_uri

__all__ = ["AuditLog", "WebhookSender", "audit_dir_for", "audit_folder"]

_log = logging.getLogger("fleet.alerts")
_warned_remote: set[str] = set()


def audit_dir_for(data_dir: str | None, state_dir: str) -> str | None:
    """The audit folder of a cluster: None (`<data_dir>/audit`) for a local data folder, `<state_dir>/audit` when the
    data folder is an object store's URI."""
    if data_dir and is_uri(data_dir) and urlsplit(data_dir).scheme != "file":
        return str(Path(state_dir).expanduser().resolve() / "audit")
    return None


def audit_folder(data_dir: str | None, audit_dir: str | None = None) -> str | None:
    """Where audit files go: `audit_dir` when set, else `<data_dir>/audit` on a local disk; None: no audit."""
    if audit_dir:
        return audit_dir
    if not data_dir:
        return None
    if is_uri(data_dir):
        parts = urlsplit(data_dir)
        if parts.scheme == "file":
            return os.path.join(parts.path, "audit")
        if data_dir not in _warned_remote:
            _warned_remote.add(data_dir)
            _log.warning("no audit files: the data folder %s is on an object store, which cannot append, and no "
                         "local audit_dir was given", data_dir)
        return None
    return os.path.join(data_dir, "audit")


class AuditLog:
    """Append-only JSON lines in `<audit folder>/<name>` (one `write` is one line, appended atomically).

    The folder is `audit_dir`, else `<data_dir>/audit` (see `audit_folder`); None of either: nothing is written.
    """

    def __init__(self, data_dir: str | None, name: str = "monitor.jsonl", *, audit_dir: str | None = None):
        folder = audit_folder(data_dir, audit_dir)
        self.path = os.path.join(folder, name) if folder else None
        self.failures = 0

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        line = (json.dumps({"time": time.time(), **record}, default=str, allow_nan=False) + "\n").encode()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            self.failures += 1
            _log.warning("could not append to the audit log %s: %s", self.path, exc)

    def tail(self, max_bytes: int) -> list[dict]:
        """The records of the log's last `max_bytes`, oldest first: a line cut there or by a crash is skipped;
        no log (or none readable): none."""
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - max_bytes))
                lines = f.read().split(b"\n")
        except OSError:
            return []
        records = []
        for line in lines[1:] if size > max_bytes else lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


class WebhookSender:
    """POSTs alarm events to a URL from a thread of its own; bounded queue, counted outcomes."""

    def __init__(self, url: str, token_file: str | None = None, *, max_queue: int = 1000, timeout_s: float = 5.0,
                 attempts: int = 3):
        self.url = url
        self.token_file = token_file
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._queue: collections.deque[dict] = collections.deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._stopped = False
        self.counts = collections.Counter()  # sent, failed, dropped
        self._thread = threading.Thread(target=self._run, name="fleet-webhook", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.counts["dropped"] += 1
            self._queue.append(event)
            self._cond.notify()

    def _token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            with open(self.token_file) as f:
                return f.read().strip() or None
        except OSError as exc:
            _log.warning("alert webhook: cannot read its token file: %s", exc)
            return None

    def _post(self, event: dict) -> None:
        body = json.dumps(event, default=str, allow_nan=False).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "fleet-monitor"})
        token = self._token()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(self.url, response.status, "not 2xx", response.headers, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._queue:
                    return
                event = self._queue.popleft()
            for attempt in range(self.attempts):
                try:
                    self._post(event)
                    self.counts["sent"] += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    if attempt == self.attempts - 1:
                        self.counts["failed"] += 1
                        _log.warning("alert webhook: %s event for %s not delivered after %d attempts: %s",
                                     event.get("alarm"), event.get("model"), self.attempts, exc)
                    else:
                        time.sleep(0.5 * 2**attempt)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
