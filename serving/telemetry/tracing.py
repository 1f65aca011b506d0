"""Request tracing with OpenTelemetry: W3C `traceparent` in and out, spans for each request and batch.

Spans (names as exported):
- per request: `infer` (a server span: the child of the client's `traceparent`, or a new trace's
  root), with children `parse`, `queue` (enqueued -> its batch sent) and `encode`;
- per batch: `batch` (a new trace's root, with an OpenTelemetry Link to the `infer` span of every
  traced request it carries), with children `preprocess` and `compute` (the model call; across
  the Ray call in split mode);
- in split mode the worker's `execute` span, the child of `compute` on the other side of the Ray
  call: the batch task holds `compute`'s (trace id, span id) in `batch_traceparent` and the ingress
  passes its `compute_traceparent()` as the keyword `traceparent` of the worker's `infer`
  (serving/workers.py); formatted there, as a colocated model never needs it.

Cost. Off (`tracing_sample_ratio` 0, the default) nothing here runs: `active()` is None, the
front end checks that once per request, the batcher once per request it queues (`self.tracing`,
an attribute) and once per batch. On, the request path only
records (name, start, end) in monotonic ns into a slotted `Trace` and appends it to a deque when
it finishes (under 1 µs a span, where the SDK's `Tracer.start_span` and `end` cost about 25). The
export thread sends them: to an OTLP/HTTP collector (`otlp_endpoint`) encoded straight from the
records (serving/telemetry/otlp.py: `native.otlp_spans`, about 0.2 µs a span; 1.5 in Python), or,
to any SDK `SpanExporter`, as the SDK's `ReadableSpan`s (about 2 µs a span to build): with no
endpoint a JSON-lines file per process under `trace_dir` (`JsonLinesSpanExporter`), in tests the
SDK's InMemorySpanExporter. What is sampled is decided once per request: a client's sampled flag is
followed, otherwise `sample_ratio` of new traces are kept.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Sequence

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from serving.telemetry.otlp import OtlpHttpExporter

__all__ = [
    "Trace", "Tracing", "JsonLinesSpanExporter", "parse_traceparent", "format_traceparent", "make_exporter",
    "setup_tracing", "active", "shutdown_tracing", "request_trace", "batch_traceparent", "compute_traceparent",
    "check_otlp_endpoint",
    "OTLP_SCHEMES",
]

_log = logging.getLogger("fleet.tracing")

OTLP_SCHEMES = ("http", "https")

# The request being answered by this task (set by `Tracing.start_request`; the batcher reads it when a request
# joins a queue), and, while a batch executes, (trace id, span id) of its `compute` span (the worker call's
# parent; `compute_traceparent` formats it).
request_trace: contextvars.ContextVar["Trace | None"] = contextvars.ContextVar("fleet_request_trace", default=None)
batch_traceparent: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "fleet_batch_traceparent", default=None)

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_V00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # exactly: 0.95 µs where the general form takes 1.15
_V00_BYTES = re.compile(_V00.pattern.encode())
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_getrandbits = random.getrandbits


def parse_traceparent(value: bytes | str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C `traceparent` header value, None when it is invalid.

    Version 00 is exactly `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, neither id all zeros; a later
    version may append `-...` fields (ignored, as W3C asks); version ff is invalid. Never raises.
    """
    if value is None:
        return None
    kind = type(value)
    if (kind is bytes or kind is str) and len(value) == 55:  # the usual form: a plain version 00, checked first
        if (_V00_BYTES if kind is bytes else _V00).fullmatch(value) is not None:
            trace_id, span_id = int(value[3:35], 16), int(value[36:52], 16)
            return (trace_id, span_id, int(value[53:55], 16)) if trace_id and span_id else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("latin-1")
    elif not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def format_traceparent(trace_id: int, span_id: int, flags: int = 1) -> str:
    """A version-00 `traceparent` value."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def compute_traceparent() -> str | None:
    """The traceparent of the executing batch's `compute` span (`batch_traceparent`), None when it is not traced."""
    ids = batch_traceparent.get()
    return None if ids is None else format_traceparent(ids[0], ids[1], 1)


def _new_id(bits: int) -> int:
    return _getrandbits(bits) or 1  # an id of zeros is invalid


class Trace:
    """One span recorded cheaply (a request's `infer`, a `batch`, a worker's `execute`) and its children.

    Times are `time.monotonic_ns()` instants (the export thread turns them into wall-clock time).
    A trace that does not record (the client sent an unsampled traceparent) still answers with a
    traceparent; its `add` and `finish` do nothing.
    """

    __slots__ = ("_tracing", "name", "kind", "trace_id", "span_id", "parent_id", "sampled", "recording",
                 "start_ns", "end_ns", "children", "links", "attributes", "error")

    def __init__(self, tracing: "Tracing", name: str, kind: SpanKind, trace_id: int, parent_id: int,
                 recording: bool, start_ns: int, links: list | None = None):
        self._tracing = tracing
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = _new_id(64)
        self.parent_id = parent_id  # 0: a root
        self.sampled = recording  # the traceparent's flag
        self.recording = recording  # False once finished
        self.start_ns = start_ns
        self.end_ns = 0
        self.children: list[tuple[str, int, int, int]] = []  # (name, start_ns, end_ns, span id or 0)
        self.links = links  # [(trace id, span id)] of the spans it carries (a batch's requests)
        self.attributes: dict | None = None
        self.error: str | None = None

    @property
    def traceparent(self) -> str:
        """This span's `traceparent`: the answer's header, a child's parent."""
        return format_traceparent(self.trace_id, self.span_id, 1 if self.sampled else 0)

    @property
    def trace_id_hex(self) -> str:
        """The trace id as logs and trace viewers show it (32 hex digits)."""
        return f"{self.trace_id:032x}"

    def add(self, name: str, start_ns: int, end_ns: int = 0, span_id: int = 0) -> None:
        """A finished child span from `start_ns` to `end_ns` (0: now); `span_id` when one was handed out
        (`child_ids`)."""
        if self.recording:
            self.children.append((name, start_ns, end_ns or time.monotonic_ns(), span_id))

    def child_ids(self) -> tuple[int, int]:
        """(trace id, span id) for a child span still to be `add`ed: the parent of a remote call's spans
        (`format_traceparent` of them is its traceparent)."""
        return self.trace_id, _new_id(64)

    def finish(self, error: BaseException | str | None = None, **attributes) -> None:
        """End the span now, with `error` (its status) and `attributes` (exported as `fleet.<name>`: model,
        version, request_id, ...); the export thread takes it from here. Later calls do nothing."""
        if not self.recording:
            return
        self.recording = False
        self.end_ns = time.monotonic_ns()
        if error is not None:
            self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if attributes:
            self.attributes = attributes if self.attributes is None else {**self.attributes, **attributes}
        self._tracing._finished(self)


class Tracing:
    """This process's tracing: sampling, the finished traces and the thread exporting them.

    `exporter`: an `OtlpHttpExporter` (fed the records) or any SDK `SpanExporter` (fed `ReadableSpan`s;
    `make_exporter`); `sample_ratio` in (0, 1]: the share of requests without a client's sampled
    traceparent that are traced.
    """

    def __init__(self, exporter: SpanExporter | OtlpHttpExporter, sample_ratio: float = 1.0, *,
                 component: str = "fleet", max_queue: int = 32_768, export_interval_s: float = 0.5,
                 max_export_traces: int = 2048, start_thread: bool = True):
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"tracing sample_ratio must be in (0, 1], got {sample_ratio!r}")
        self.exporter = exporter
        self.sample_ratio = sample_ratio
        self.max_queue = max_queue
        self.max_export_traces = max_export_traces  # per export call (an OTLP request)
        self.dropped = 0  # finished traces not exported: the queue was full
        self.exported = 0  # spans handed to the exporter
        self.failed = 0  # of those, spans the exporter could not deliver
        self.resource = Resource.create({"service.name": "fleet", "fleet.component": component,
                                         "service.instance.id": f"{component}-{os.getpid()}"})
        self._scope = InstrumentationScope("fleet")
        self._done: collections.deque[Trace] = collections.deque()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._warned_at = 0.0
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._run, args=(export_interval_s,), name="fleet-tracing",
                                            daemon=True)
            self._thread.start()

    # -- the request path --------------------------------------------------------------
    def start_request(self, traceparent: bytes | str | None = None, start_ns: int = 0) -> Trace | None:
        """A request's `infer` span: the child of a valid `traceparent` (its sampled flag decides whether it
        records), else a new trace kept with probability `sample_ratio`. None when nothing is traced and there
        is no traceparent to answer with. Also this task's `request_trace` (None unless it records), which
        the batcher reads when the request joins a queue."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is not None:
            trace = Trace(self, "infer", SpanKind.SERVER, parent[0], parent[1], bool(parent[2] & 1),
                          start_ns or time.monotonic_ns())
        elif self.sample_ratio >= 1.0 or random.random() < self.sample_ratio:
            trace = Trace(self, "infer", SpanKind.SERVER, _new_id(128), 0, True, start_ns or time.monotonic_ns())
        else:
            request_trace.set(None)
            return None
        request_trace.set(trace if trace.recording else None)
        return trace

    def start_batch(self, traces: Sequence[Trace], start_ns: int, **attributes) -> Trace | None:
        """A `batch` span (a new trace) linked to the recording `traces` it carries; None when none records."""
        links = [(t.trace_id, t.span_id) for t in traces if t.recording]
        if not links:
            return None
        trace = Trace(self, "batch", SpanKind.INTERNAL, _new_id(128), 0, True, start_ns, links)
        trace.attributes = attributes or None
        return trace

    def start_remote(self, traceparent: str | None, name: str, **attributes) -> Trace | None:
        """A span continuing a trace from another process (a worker's `execute` under the batch's `compute`),
        None unless `traceparent` is valid and sampled."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None or not parent[2] & 1:
            return None
        trace = Trace(self, name, SpanKind.SERVER, parent[0], parent[1], True, time.monotonic_ns())
        trace.attributes = attributes or None
        return trace

    def _finished(self, trace: Trace) -> None:
        if len(self._done) >= self.max_queue:
            self.dropped += 1
            return
        self._done.append(trace)

    # -- the export thread -------------------------------------------------------------
    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self) -> int:
        """Export every finished trace now; the number of spans handed to the exporter."""
        with self._flush_lock:
            done = self._done
            traces = [done.popleft() for _ in range(len(done))]
            if not traces:
                return 0
            export_traces = getattr(self.exporter, "export_traces", None)  # OTLP: straight from the records
            step = self.max_export_traces
            spans = 0
            for i in range(0, len(traces), step):
                chunk = traces[i:i + step]
                count = sum(1 + len(t.children) for t in chunk)
                try:
                    if export_traces is not None:
                        ok = export_traces(chunk, time.time_ns() - time.monotonic_ns(), self.resource)
                    else:
                        ok = self.exporter.export(self._spans(chunk)) is SpanExportResult.SUCCESS
                except Exception as exc:  # noqa: BLE001 - tracing must never take serving down
                    ok = False
                    self._warn(f"exporting {count} spans raised {type(exc).__name__}: {exc}")
                if not ok:
                    self.failed += count
                    self._warn(f"{self.failed} spans so far could not be exported (the last {count} now)")
                spans += count
            self.exported += spans
            if self.dropped:
                self._warn(f"{self.dropped} traces dropped so far: the export queue ({self.max_queue}) was full")
            return spans

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60.0:  # at most one a minute: a collector that is down must not flood the log
            self._warned_at = now
            _log.warning("tracing: %s", message)

    def _spans(self, traces: list[Trace]) -> list[ReadableSpan]:
        """The SDK's spans of finished traces (monotonic instants turned into wall-clock ns)."""
        offset = time.time_ns() - time.monotonic_ns()
        resource, scope, sampled, internal, unset = self.resource, self._scope, _SAMPLED, SpanKind.INTERNAL, _UNSET
        getrandbits, span = _getrandbits, ReadableSpan
        spans = []
        append = spans.append
        for t in traces:  # positional arguments: this loop is most of what tracing costs (see the docstring)
            trace_id = t.trace_id
            context = SpanContext(trace_id, t.span_id, False, sampled)
            parent = SpanContext(trace_id, t.parent_id, True, sampled) if t.parent_id else None
            links = [Link(SpanContext(tid, sid, False, sampled)) for tid, sid in t.links] if t.links else ()
            attributes = {f"fleet.{k}": v for k, v in t.attributes.items() if v is not None} if t.attributes else {}
            status = Status(StatusCode.ERROR, t.error) if t.error else unset
            append(span(t.name, context, parent, resource, attributes, (), links, t.kind, None, status,
                        t.start_ns + offset, t.end_ns + offset, scope))
            for name, start, end, span_id in t.children:
                child = SpanContext(trace_id, span_id or getrandbits(64) or 1, False, sampled)
                append(span(name, child, context, resource, {}, (), (), internal, None, unset, start + offset,
                            end + offset, scope))
        return spans

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, export what is left, shut the exporter down (a replica's stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.flush()
        try:
            self.exporter.shutdown()
        except Exception as exc:  # noqa: BLE001
            _log.warning("tracing: shutting the exporter down failed: %s", exc)


class JsonLinesSpanExporter(SpanExporter):
    """Spans as JSON lines appended to a file (tracing on without an OTLP endpoint): one object per span with
    trace_id, span_id, parent_span_id (hex), name, kind, start/end (unix ns), status, attributes, links."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the exporter's life
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            c, p = s.context, s.parent
            doc = {"trace_id": f"{c.trace_id:032x}", "span_id": f"{c.span_id:016x}",
                   "parent_span_id": f"{p.span_id:016x}" if p is not None else None, "name": s.name,
                   "kind": s.kind.name, "start_unix_ns": s.start_time, "end_unix_ns": s.end_time,
                   "status": s.status.status_code.name}
            if s.status.description:
                doc["error"] = s.status.description
            if s.attributes:
                doc["attributes"] = dict(s.attributes)
            if s.links:
                doc["links"] = [{"trace_id": f"{link.context.trace_id:032x}",
                                 "span_id": f"{link.context.span_id:016x}"} for link in s.links]
            lines.append(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
        try:
            with self._lock:
                self._file.write(b"".join(lines))
                self._file.flush()
        except (OSError, ValueError):
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def check_otlp_endpoint(value: str) -> str:
    """`value` if it is an OTLP endpoint fleet can send to; ValueError naming it otherwise."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in OTLP_SCHEMES or not rest.strip("/"):
        raise ValueError(f"otlp_endpoint must be an OTLP/HTTP collector's http(s)://host:port[/path], got {value!r}")
    return value


def make_exporter(otlp_endpoint: str | None, trace_dir: str | None = None,
                  component: str = "fleet") -> SpanExporter | OtlpHttpExporter:
    """The exporter of `otlp_endpoint`: http(s)://host:4318[/path] OTLP/HTTP (protobuf; /v1/traces when no path
    is given; serving/telemetry/otlp.py); None: `<trace_dir>/<component>-<pid>.jsonl` (JSON lines).
    Raises ValueError naming a bad endpoint."""
    if otlp_endpoint is None:
        if trace_dir is None:
            raise ValueError("tracing needs an otlp_endpoint or a trace_dir to write spans to")
        return JsonLinesSpanExporter(Path(trace_dir) / f"{component}-{os.getpid()}.jsonl")
    return OtlpHttpExporter(check_otlp_endpoint(otlp_endpoint))


_active: Tracing | None = None
_active_lock = threading.Lock()


def setup_tracing(sample_ratio: float, otlp_endpoint: str | None = None, trace_dir: str | None = None, *,
                  component: str = "fleet") -> Tracing | None:
    """This process's tracing from the serving options, once (a second call returns the first one's);
    None when `sample_ratio` is 0 (tracing off). Shut down with `shutdown_tracing()` (also at exit)."""
    global _active
    if sample_ratio <= 0.0:
        return None
    with _active_lock:
        if _active is None:
            _active = Tracing(make_exporter(otlp_endpoint, trace_dir, component), sample_ratio, component=component)
            atexit.register(shutdown_tracing)
            _log.info("tracing %.0f%% of requests to %s", 100 * sample_ratio,
                      otlp_endpoint or getattr(_active.exporter, "path", "?"))
        return _active


def active() -> Tracing | None:
    """This process's tracing, None when it is off."""
    return _active


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Export what is left and stop (a replica's stop); tracing is off afterwards."""
    global _active
    with _active_lock:
        tracing, _active = _active, None
    if tracing is not None:
        tracing.shutdown(timeout_s)
