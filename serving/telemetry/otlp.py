"""OTLP/HTTP export of fleet's traces: OTLP protobuf written by hand from `serving.telemetry.tracing.Trace` records.

Why not the SDK's spans and the opentelemetry-exporter-otlp-proto-http package: its encoder builds
a protobuf message object per span, field by field (and hashes the span's Resource through a JSON
dump per span), about 25 µs a span measured here, and building the SDK's `ReadableSpan` first
costs 2 more: with 4-5 spans a request that is twice what the traced request itself costs. Written
straight from the records (a request's children share its ids' bytes, names and attribute
encodings are cached) it is about 1.5 µs a span in Python, and `native.otlp_spans`
(native/src/otlp.cpp) writes the same bytes in C++ in about a sixth of that (7.0 -> 1.2 µs for a
traced request's spans); the Python encoder (`python_spans`) stays as its reference and serves when
the native kernels are not built. The unit tests decode this output with
opentelemetry-proto's messages and compare it with the SDK spans of the same records, and compare the
two encoders byte for byte.

`OtlpHttpExporter.export_traces` POSTs `application/x-protobuf` to the endpoint (`<url>/v1/traces`
when the URL has no path) from the tracing thread, one request per call over a kept-alive connection,
with a timeout and no retry (but one on a new connection when the kept one was closed by the collector):
a batch the collector does not take is dropped and reported (serving/telemetry/tracing.py counts and
warns).
"""

from __future__ import annotations

import random
import struct
import http.client
import urllib.parse
from typing import TYPE_CHECKING, Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

import native

if TYPE_CHECKING:
    from serving.telemetry.tracing import Trace

__all__ = ["OtlpHttpExporter", "encode_traces", "python_spans", "traces_url"]

_Q = struct.Struct("<Q").pack  # fixed64
_I = struct.Struct("<I").pack  # fixed32
_D = struct.Struct("<d").pack  # double
# Span.flags (field 16, fixed32; trace.proto SpanFlags): whether the parent is remote is known (0x100), and it is.
_FLAGS_LOCAL = b"\x85\x01" + _I(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _I(0x300)
_LINK_FLAGS = b"\x35" + _I(0x100)  # Link.flags (field 6): a span of this process
_LINK = b"\x6a" + bytes((18 + 10 + len(_LINK_FLAGS),))  # Span.links (field 13): trace id, span id, flags
_INTERNAL = b"\x30\x01"  # Span.kind: OTLP's SPAN_KIND_INTERNAL
_getrandbits = random.getrandbits


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(value) -> bytes:
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _D(value)
    return _field(b"\x0a", str(value).encode())


def _key_value(tag: bytes, key: str, value) -> bytes:
    return _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))


class _Cache(dict):
    """Encodings of what repeats from span to span (names, a model's attributes), bounded."""

    def __init__(self, encode):
        super().__init__()
        self.encode = encode

    def __missing__(self, key):
        if len(self) >= 4096:
            self.clear()
        value = self[key] = self.encode(key)
        return value


_NAMES = _Cache(lambda name: _field(b"\x2a", name.encode()))  # Span.name (field 5)
# Span.attributes (field 9), one (key, value) each, keys as exported: `fleet.<name>` (serving/telemetry/tracing.py).
_ATTRIBUTES = _Cache(lambda item: _key_value(b"\x4a", f"fleet.{item[0]}", item[1]))
_KINDS = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}  # the SDK's INTERNAL is 0, OTLP's 1
_TIMES = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano (field 7) and end (8), fixed64 each
# A child span (trace id 18 bytes, id 10, parent 10, name, kind 2, times 18, flags 6): its field's head, by name.
_CHILD_NAMES = _Cache(lambda name: _NAMES[name] + _INTERNAL)
_CHILD_HEADS = _Cache(lambda name: b"\x12" + _varint(18 + 10 + 10 + len(_CHILD_NAMES[name]) + 18 + 6))


_UNIQUE = frozenset({"request_id"})  # attributes whose values rarely repeat: not cached


def _attributes(attributes: Mapping) -> bytes:
    parts = []
    for item in attributes.items():
        if item[1] is None:
            continue
        if item[0] in _UNIQUE:
            parts.append(_key_value(b"\x4a", f"fleet.{item[0]}", item[1]))
            continue
        try:
            parts.append(_ATTRIBUTES[item])
        except TypeError:  # a value that cannot be a key (a list): encoded each time
            parts.append(_key_value(b"\x4a", f"fleet.{item[0]}", item[1]))
    return b"".join(parts)


def _spans(trace: "Trace", offset_ns: int) -> list[bytes]:
    """ScopeSpans.spans fields (field 2) of a trace's span and its children."""
    trace_id = b"\x0a\x10" + trace.trace_id.to_bytes(16, "big")
    span_id = trace.span_id.to_bytes(8, "big")
    parts = [trace_id, b"\x12\x08", span_id]
    if trace.parent_id:
        parts += (b"\x22\x08", trace.parent_id.to_bytes(8, "big"))
    parts += (_NAMES[trace.name], _KINDS[trace.kind], _TIMES(0x39, trace.start_ns + offset_ns, 0x41,
                                                             trace.end_ns + offset_ns))
    if trace.attributes:
        parts.append(_attributes(trace.attributes))
    if trace.links:
        parts += [_LINK + b"\x0a\x10" + tid.to_bytes(16, "big") + b"\x12\x08" + sid.to_bytes(8, "big") + _LINK_FLAGS
                  for tid, sid in trace.links]
    if trace.error:
        status = _field(b"\x12", trace.error.encode()) + b"\x18\x02"  # Status: message, STATUS_CODE_ERROR
        parts.append(_field(b"\x7a", status))
    parts.append(_FLAGS_REMOTE if trace.parent_id else _FLAGS_LOCAL)  # a parent is remote: the client, the ingress
    body = b"".join(parts)
    out = [b"\x12" + _varint(len(body)) + body]
    ids = trace_id + b"\x12\x08"
    parent = b"\x22\x08" + span_id
    for name, start, end, child_id in trace.children:  # all fixed-size but the name: a cached head per name
        out += (_CHILD_HEADS[name], ids, (child_id or _getrandbits(64) or 1).to_bytes(8, "big"), parent,
                _CHILD_NAMES[name], _TIMES(0x39, start + offset_ns, 0x41, end + offset_ns), _FLAGS_LOCAL)
    return out


def python_spans(traces: Sequence["Trace"], offset_ns: int) -> bytes:
    """The ScopeSpans.spans fields of `traces`: the reference of `native.otlp_spans` (the same bytes, but for the
    random ids of children that had none)."""
    spans = []
    for trace in traces:
        spans += _spans(trace, offset_ns)
    return b"".join(spans)


def encode_traces(traces: Sequence["Trace"], offset_ns: int, resource: Resource, scope: str = "fleet") -> bytes:
    """An OTLP ExportTraceServiceRequest (protobuf bytes) of finished traces and their children;
    `offset_ns` turns their monotonic instants into unix ns. The spans are encoded by `native.otlp_spans` when
    the native kernels are built (a sixth of the time), else in Python."""
    spans = _encode_spans(traces if isinstance(traces, list) else list(traces), offset_ns)
    resource_field = _field(b"\x0a", b"".join(_key_value(b"\x0a", k, v) for k, v in resource.attributes.items()))
    scope_spans = _field(b"\x12", _field(b"\x0a", _field(b"\x0a", scope.encode())) + spans)
    schema = _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
    return _field(b"\x0a", resource_field + scope_spans + schema)  # ExportTraceServiceRequest.resource_spans


_encode_spans = native.otlp_spans or python_spans


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of `endpoint`: as given when it has a path, else `<endpoint>/v1/traces`."""
    scheme, _, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    return endpoint if slash and path else f"{scheme}://{host}/v1/traces"


class OtlpHttpExporter:
    """Finished traces to an OpenTelemetry collector's OTLP/HTTP endpoint (protobuf), `timeout_s` a request,
    over one kept-alive connection (opened again when the collector closed it: one more attempt then, only
    when the kept one failed; no other retry)."""

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None):
        self.url = traces_url(endpoint)
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._host, self._port, timeout=self.timeout_s)

    def export_traces(self, traces: Sequence["Trace"], offset_ns: int, resource: Resource) -> bool:
        """Send them; False when the collector did not take them (unreachable, an error status)."""
        body = encode_traces(traces, offset_ns, resource)
        for _ in range(2):  # a second attempt only after a kept connection failed: then on a new one
            reused = self._connection is not None
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self._path, body, self.headers)
                answer = connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException, ValueError):
                connection.close()
                self._connection = None
                if reused:  # the collector closed a kept-alive connection: once more, anew
                    continue
                return False
            if answer.will_close:
                connection.close()
                self._connection = None
            else:
                self._connection = connection
            return 200 <= answer.status < 300
        return False

    def shutdown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
