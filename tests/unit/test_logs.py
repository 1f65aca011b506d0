"""fleet's logs (serving/telemetry/logs.py): JSON lines with the request and model fields, and `fleet.*` INFO records
reaching a replica's log file as Ray Serve sets it up (its own `configure_component_logger`, buffered as
in throughput-optimized mode), where they did not before."""

from __future__ import annotations

import builtins
import logging
import sys

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.breaker import BreakerConfig, CircuitBreaker
from serving.telemetry.logs import JsonFormatter, TextFormatter, configure_logging, log_fields
from serving.telemetry.tracing import Tracing


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging and Serve change process-wide loggers and streams: put them back."""
    saved = {name: (list(lg.handlers), lg.level, lg.propagate)
             for name, lg in ((n, logging.getLogger(n or None)) for n in ("fleet", "ray.serve", ""))}
    streams = (sys.stdout, sys.stderr, builtins.print)
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name or None)
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    sys.stdout, sys.stderr, builtins.print = streams


def _record(msg="model %s: switched", *args, exc_info=None, **extra) -> logging.LogRecord:
    record = logging.getLogger("fleet.versions").makeRecord(
        "fleet.versions", logging.INFO, __file__, 1, msg, args or ("fraud",), exc_info)
    record.__dict__.update(extra)
    return record


def test_json_line_carries_the_fields():
    trace = Tracing(InMemorySpanExporter(), start_thread=False).start_request(f"00-{'ab' * 16}-{'cd' * 8}-01")
    fields = log_fields(request_id="r-1", trace=trace, model="fraud", version=3, event="version_switch")
    line = JsonFormatter({"deployment": "fleet_ingress"}).format(_record(**fields))
    doc = orjson.loads(line)
    assert doc["level"] == "INFO" and doc["logger"] == "fleet.versions"
    assert doc["message"] == "model fraud: switched"
    assert doc["request_id"] == "r-1" and doc["trace_id"] == "ab" * 16
    assert doc["model"] == "fraud" and doc["version"] == "3" and doc["event"] == "version_switch"
    assert doc["deployment"] == "fleet_ingress"
    assert doc["ts"].endswith("Z") and doc["ts"][10] == "T" and len(doc["ts"]) == 24
    assert "\n" not in line


def test_json_line_has_only_the_fields_present_and_the_traceback_as_a_string():
    try:
        raise ValueError("bad input")
    except ValueError:
        record = _record("%s failed", exc_info=sys.exc_info(), model="fraud", version=None)
    doc = orjson.loads(JsonFormatter().format(record))
    assert set(doc) == {"ts", "level", "logger", "message", "model", "exc"}
    assert doc["exc"].startswith("Traceback") and "ValueError: bad input" in doc["exc"]
    # A value orjson cannot encode natively is written as its str, never an exception.
    assert orjson.loads(JsonFormatter().format(_record(model=object())))["model"].startswith("<object")


def test_text_line_ends_with_the_fields():
    line = TextFormatter().format(_record(model="fraud", version="3"))
    assert line.endswith("INFO fleet.versions: model fraud: switched model=fraud version=3")


def _serve_replica_logger(tmp_path):
    """The `ray.serve` logger as a Serve replica has it: Ray's own set-up, buffering 1000 records as
    RAY_SERVE_THROUGHPUT_OPTIMIZED does (fleet's default)."""
    from ray.serve._private.common import ServeComponentType
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    configure_component_logger(component_name="fleet_ingress", component_id="abc123",
                               logging_config=LoggingConfig(logs_dir=str(tmp_path)),
                               component_type=ServeComponentType.REPLICA, max_bytes=1 << 20, backup_count=1,
                               buffer_size=1000)
    (path,) = tmp_path.glob("replica_*.log")
    return path


def test_fleet_info_reaches_the_replica_log_only_once_configured(tmp_path):
    path = _serve_replica_logger(tmp_path)
    logging.getLogger("fleet").handlers.clear()
    logging.getLogger("fleet").setLevel(logging.NOTSET)
    logging.getLogger("fleet").propagate = True
    logging.getLogger("fleet.x").info("before configure_logging")
    assert "before configure_logging" not in path.read_text()  # the root logger drops fleet's INFO

    configure_logging("text", replica=True)
    logging.getLogger("fleet.x").info("model %s: serving versions [3]", "fraud",
                                      extra={"model": "fraud", "version": "3", "event": "version_switch"})
    text = path.read_text()  # at once, though Serve's handler buffers 1000 records
    (line,) = [ln for ln in text.splitlines() if "serving versions" in ln]
    assert line.startswith("INFO") and "fleet_ingress" in line
    assert line.endswith("model fraud: serving versions [3] model=fraud version=3 event=version_switch")
    logging.getLogger("fleet.x").debug("not at INFO")
    assert "not at INFO" not in path.read_text()


def test_json_replica_log(tmp_path):
    path = _serve_replica_logger(tmp_path)
    configure_logging("json", replica={"deployment": "fleet_ingress", "replica": "abc123"})
    logging.getLogger("fleet.breaker").warning("model %s: breaker open", "fraud",
                                               extra={"model": "fraud", "event": "breaker_open"})
    logging.getLogger("ray.serve").info("Serve's own line")
    logging.getLogger("fleet.x").info("flush")
    docs = [orjson.loads(line) for line in path.read_text().splitlines()]  # every line is one JSON object
    first = next(d for d in docs if d["message"] == "model fraud: breaker open")
    assert first["level"] == "WARNING" and first["logger"] == "fleet.breaker"
    assert first["model"] == "fraud" and first["event"] == "breaker_open"
    assert first["deployment"] == "fleet_ingress" and first["replica"] == "abc123"
    assert any(d["message"] == "Serve's own line" and d["logger"] == "ray.serve" for d in docs)


def test_outside_a_replica_fleet_logs_go_to_stderr(capsys):
    logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))  # a process's own root handler: no echo
    configure_logging("json", replica=False)
    configure_logging("json", replica=False)  # again: replaces, never doubles
    logging.getLogger("fleet.monitor").info("alarm raised", extra={"model": "fraud", "version": "2"})
    (line,) = capsys.readouterr().err.splitlines()
    doc = orjson.loads(line)
    assert (doc["message"], doc["model"], doc["version"]) == ("alarm raised", "fraud", "2")
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("yaml", replica=False)


def test_breaker_changes_are_logged_with_the_model(capsys):
    configure_logging("json", replica=False)
    now = [0.0]
    breaker = CircuitBreaker("fraud", BreakerConfig(failures=1, cooldown_s=1.0), clock=lambda: now[0])
    breaker.failure("connection refused")
    now[0] = 2.0
    assert breaker.allow()
    breaker.success()
    docs = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(d["event"], d["model"], d["level"]) for d in docs] == [
        ("breaker_open", "fraud", "WARNING"), ("breaker_half_open", "fraud", "INFO"),
        ("breaker_closed", "fraud", "INFO")]
