"""fleet's logs: its `fleet.*` loggers at INFO in every replica's log, as text (the default) or JSON lines.

In a Ray Serve replica the `ray.serve` logger owns the replica's log: a file under the Ray
session's `logs/serve/` (`replica_<app>_<deployment>_<id>.log`, behind a MemoryHandler that
holds up to RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE records, 1000 in throughput-optimized mode)
and stderr unless RAY_SERVE_LOG_TO_STDERR=0. fleet's loggers propagate to the root logger, which
has no handler there: their INFO records were dropped. `configure_logging` gives the `fleet`
logger INFO and a handler that hands each record to the `ray.serve` handlers and flushes them (fleet
logs nothing per request, so a lifecycle event is in the file when it happens). With `json` the
replica's handlers format with `JsonFormatter`, so every line of its log (Serve's own too) is one
JSON object. Outside a replica (the monitor actor, a plain process) the records go to stderr.

Fields: a record logged with `extra=log_fields(...)` (or `extra={"model": ..., ...}`) carries
request_id, trace_id, model, version and event; JSON lines hold each one present, text lines end
with them as `key=value`. Lifecycle events use `event`: version_switch, rollout, breaker, drain.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "in_ray_actor", "log_fields", "FIELDS",
           "LOG_FORMATS"]

FIELDS = ("request_id", "trace_id", "model", "version", "event")
LOG_FORMATS = ("text", "json")
# Ray Serve's context of a record, when its filters set it (a replica's request, route, deployment).
_SERVE_FIELDS = ("route", "application", "deployment", "replica")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_fields(*, request_id: str | None = None, trace=None, model: str | None = None, version=None,
               event: str | None = None) -> dict[str, Any]:
    """`extra=` of a record about a request or a model: the fields that are set (`trace`: a
    serving.telemetry.tracing.Trace or None)."""
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["request_id"] = request_id
    if trace is not None:
        doc["trace_id"] = trace.trace_id_hex
    if model is not None:
        doc["model"] = model
    if version is not None:
        doc["version"] = str(version)
    if event is not None:
        doc["event"] = event
    return doc


def _fields(record: logging.LogRecord) -> list[tuple[str, Any]]:
    values = record.__dict__
    return [(key, values[key]) for key in FIELDS if values.get(key) is not None]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger, message, the `FIELDS` present,
    Serve's context when set, `static` (e.g. the replica's deployment), and `exc` (the traceback)."""

    def __init__(self, static: Mapping[str, Any] | None = None):
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        values = record.__dict__
        for key in FIELDS:
            value = values.get(key)
            if value is not None:
                doc[key] = value
        for key in _SERVE_FIELDS:
            value = values.get(key)
            if value is not None and key not in doc:
                doc[key] = value
        for key, value in self.static.items():
            doc.setdefault(key, value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> key=value ...` with the `FIELDS` present."""

    def __init__(self):
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the line
        return head + " " + " ".join(f"{k}={v}" for k, v in fields) + sep + tail


class _ToServeLog(logging.Handler):
    """Hands fleet's records to the `ray.serve` logger's handlers (the replica's log file and stderr) and flushes
    them. With `fields_in_message` (text) the fields are appended to the message: Serve's text format shows
    only the message."""

    def __init__(self, fields_in_message: bool):
        super().__init__()
        self.fields_in_message = fields_in_message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.fields_in_message:
                fields = _fields(record)
                if fields:
                    record = logging.makeLogRecord(record.__dict__)
                    record.msg = record.getMessage() + " " + " ".join(f"{k}={v}" for k, v in fields)
                    record.args = None
            for handler in logging.getLogger("ray.serve").handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
                    handler.flush()  # Serve's MemoryHandler would hold it until 1000 records or an ERROR
        except Exception:  # noqa: BLE001 - logging must never fail the caller
            self.handleError(record)


def _replica_context() -> dict[str, str] | None:
    """{deployment, replica} of the Serve replica this process is, None outside one."""
    if "ray.serve" not in sys.modules:
        return None
    try:
        from ray import serve

        context = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - RayServeException: not a replica
        return None
    return {"deployment": context.deployment, "replica": context.replica_tag}


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor's (where `configure_logging` belongs; not a test or the driver)."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def configure_logging(log_format: str = "text", *, replica: Mapping[str, str] | bool | None = None,
                      level: int = logging.INFO) -> None:
    """Make this process's `fleet.*` records reach its log at `level` (INFO), as `log_format` ("text" or "json").

    Call once per process at start (an ingress or worker replica, the monitor actor); calling again
    replaces what the last call set. `replica`: this is a Serve replica (a mapping: its deployment and
    replica for JSON lines) or not (False); None: ask Serve.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    if replica is None:
        replica = _replica_context() or False
    fleet = logging.getLogger("fleet")
    for handler in [h for h in fleet.handlers if getattr(h, "_fleet", False)]:
        fleet.removeHandler(handler)
    static = dict(replica) if isinstance(replica, Mapping) else {}
    if replica is not False:
        handler: logging.Handler = _ToServeLog(fields_in_message=log_format == "text")
        if log_format == "json":
            formatter = JsonFormatter(static)
            for serve_handler in logging.getLogger("ray.serve").handlers:
                serve_handler.setFormatter(formatter)
                target = getattr(serve_handler, "target", None)  # the file behind Serve's MemoryHandler
                if target is not None:
                    target.setFormatter(formatter)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(static) if log_format == "json" else TextFormatter())
    handler._fleet = True  # ours: replaced by the next call
    fleet.addHandler(handler)
    fleet.setLevel(level)
    # The root logger would print WARNING and above once more (its last-resort handler, or Serve's stderr
    # redirect into the same file).
    fleet.propagate = False
