"""Request tracing (serving/telemetry/tracing.py): W3C traceparent, the spans of a request and its batch, the worker's
spans across the Ray call (a traceparent string handed over, as the DeploymentHandle call carries it), and
tracing off doing nothing. Spans are read from the SDK's InMemorySpanExporter."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from serving.telemetry import tracing as tracing_module
from serving.batching import Batcher, BatcherConfig
from serving.telemetry.otlp import OtlpHttpExporter, encode_traces
from serving.telemetry.tracing import (
    JsonLinesSpanExporter, Tracing, compute_traceparent, format_traceparent, make_exporter, parse_traceparent,
    request_trace, setup_tracing,
)
from serving.workers import ModelWorker

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


@pytest.fixture(autouse=True)
def no_request_trace():
    """start_request sets this task's request trace: a sync test's would outlive it."""
    token = request_trace.set(None)
    yield
    request_trace.reset(token)


# -- traceparent -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [VALID, VALID.encode(), f"  {VALID}\t", f"00-{TRACE}-{SPAN}-00",
                                   f"00-{TRACE}-{SPAN}-09"])
def test_valid_traceparent(value):
    trace_id, span_id, flags = parse_traceparent(value)
    assert (trace_id, span_id) == (int(TRACE, 16), int(SPAN, 16))
    assert flags == int(str(value if isinstance(value, str) else value.decode()).strip()[-2:], 16)


def test_a_later_version_may_append_fields():
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-01-what-comes-next") == (int(TRACE, 16), int(SPAN, 16), 1)
    assert parse_traceparent(f"cc-{TRACE}-{SPAN}-01") is not None


@pytest.mark.parametrize("value", [
    VALID.upper(),  # uppercase hex is not allowed
    f"00-{TRACE.upper()}-{SPAN}-01",
    f"00-{TRACE}-{SPAN.upper()}-01",
    f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
    f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
    f"0g-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-01-extra",  # version 00 is exactly 55 characters
    f"00-{TRACE}-{SPAN}-011",
    f"01-{TRACE}-{SPAN}-01x",  # a later version's extra fields start with '-'
    f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
    f"00-{TRACE}z-{SPAN}-01",
    f"00-{TRACE}-{SPAN[:-1]}-01",
    f"00-{TRACE}-{SPAN}-1",
    f"00_{TRACE}_{SPAN}_01",
    f"00-{TRACE}-{SPAN}-0x",
    "", "00", "-", "garbage", f"00-{TRACE}-{SPAN}-01\n",
    b"\xff\xfe\x00\x01" * 14, b"\x00" * 55, bytes(range(256)),
    None, 12345,
])
def test_invalid_traceparent_is_none_never_an_exception(value):
    assert parse_traceparent(value) is None


def test_format_traceparent_round_trips():
    assert format_traceparent(int(TRACE, 16), int(SPAN, 16), 1) == VALID
    assert parse_traceparent(format_traceparent(1, 2, 0)) == (1, 2, 0)


# -- the request path --------------------------------------------------------------------------
@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter, 1.0, component="ingress", start_thread=False)
    yield tracing, exporter
    tracing.shutdown()


def test_a_request_continues_the_clients_trace(traced):
    tracing, exporter = traced
    trace = tracing.start_request(VALID.encode())
    assert trace.trace_id_hex == TRACE
    answered = parse_traceparent(trace.traceparent)
    assert answered[0] == int(TRACE, 16)  # the client's trace
    assert answered[1] not in (0, int(SPAN, 16))  # this server's span, not the client's
    assert answered[2] == 1
    assert request_trace.get() is trace
    trace.finish(model="fraud", version="3")
    tracing.flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == "infer" and span.kind is SpanKind.SERVER
    assert span.context.trace_id == int(TRACE, 16) and span.parent.span_id == int(SPAN, 16)
    assert span.context.span_id == answered[1]
    assert span.attributes == {"fleet.model": "fraud", "fleet.version": "3"}
    assert span.end_time >= span.start_time > 0


def test_an_unsampled_client_trace_is_answered_but_not_recorded(traced):
    tracing, exporter = traced
    trace = tracing.start_request(f"00-{TRACE}-{SPAN}-00")
    assert parse_traceparent(trace.traceparent)[0::2] == (int(TRACE, 16), 0)
    assert request_trace.get() is None  # the batcher sees no trace: no queue span, no batch span
    trace.add("parse", time.monotonic_ns())
    trace.finish()
    assert tracing.flush() == 0 and not exporter.get_finished_spans()


def test_sampling_is_decided_once_per_request():
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter, 0.1, start_thread=False)
    kept = [tracing.start_request() for _ in range(4000)]
    sampled = [t for t in kept if t is not None]
    assert 250 < len(sampled) < 550  # ~10 %
    assert all(t.recording for t in sampled)
    assert tracing.start_request(VALID) is not None  # a client's sampled trace is always kept
    with pytest.raises(ValueError, match="sample_ratio"):
        Tracing(exporter, 0.0, start_thread=False)


def test_a_full_export_queue_drops_and_counts(traced):
    tracing, exporter = traced
    tracing.max_queue = 2
    for _ in range(5):
        tracing.start_request().finish()
    assert tracing.dropped == 3
    assert tracing.flush() == 2


def test_children_after_finish_are_ignored(traced):
    tracing, exporter = traced
    trace = tracing.start_request()
    trace.add("parse", time.monotonic_ns())
    trace.finish(RuntimeError("boom"))
    trace.add("queue", time.monotonic_ns())  # a shadow copy queued after the answer: not this request's span
    trace.finish()
    tracing.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"infer", "parse"}
    assert spans["infer"].status.status_code is StatusCode.ERROR
    assert "RuntimeError: boom" in spans["infer"].status.description


class _ModelWorker(ModelWorker):
    def __del__(self):  # Serve awaits the real one at a replica's stop
        pass


class _Worker:
    """The worker side of split mode: its own process's tracing and ModelWorker.infer, reached with what a
    DeploymentHandle call carries (the version, the arrays, the traceparent string)."""

    def __init__(self):
        self.exporter = InMemorySpanExporter()
        self.worker = _ModelWorker.__new__(_ModelWorker)  # Serve's async constructor loads models: not needed
        self.worker.tracing = Tracing(self.exporter, 1.0, component="worker-m", start_thread=False)
        runner = type("Runner", (), {})()
        runner.model = "m"

        async def infer(version, inputs):
            return {"y": inputs["x"] * 10}

        runner.infer = infer
        self.worker.runner = runner
        self.seen: list[str | None] = []

    async def execute(self, inputs: dict) -> dict:  # the ingress's HandleWorkerClient, as the lead wires it
        traceparent = compute_traceparent()
        self.seen.append(traceparent)
        wire = orjson.loads(orjson.dumps({"traceparent": traceparent}))  # crosses a process boundary as text
        if wire["traceparent"] is None:
            return await self.worker.infer(1, inputs)
        return await self.worker.infer(1, inputs, traceparent=wire["traceparent"])


async def _request(tracing, batcher, x: float, header: str | None = None):
    start = time.monotonic_ns()
    trace = tracing.start_request(header, start) if tracing is not None else None
    if trace is not None:
        trace.add("parse", start)
    result = await batcher.submit({"x": np.array([[x]], dtype=np.float32)})
    if trace is not None:
        encode = time.monotonic_ns()
        trace.add("encode", encode)
        trace.finish(model="m", version="1")
    return trace, result


async def test_spans_of_requests_their_batch_and_the_worker(traced):
    tracing, exporter = traced
    worker = _Worker()
    batcher = Batcher("m:1", worker.execute, BatcherConfig(max_batch_size=8, max_queue_delay_us=30_000, hold=True))
    batcher.tracing = tracing  # what a batcher made after setup_tracing() picks up itself
    results = await asyncio.gather(_request(tracing, batcher, 1.0, VALID), _request(tracing, batcher, 2.0),
                                   _request(tracing, batcher, 3.0))
    assert [r.batch_rows for _, r in results] == [3, 3, 3]  # one batch carried the three
    await batcher.close()
    tracing.flush()
    worker.worker.tracing.flush()

    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(["infer", "parse", "queue", "encode"] * 3 + ["batch", "preprocess", "compute"])
    by_id = {s.context.span_id: s for s in spans}
    requests = [s for s in spans if s.name == "infer"]
    assert {s.context.trace_id for s in requests} >= {int(TRACE, 16)}
    assert len({s.context.trace_id for s in requests}) == 3  # the client's, and two new ones
    for request in requests:
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id}
        assert children == {"parse", "queue", "encode"}
        assert all(s.context.trace_id == request.context.trace_id for s in spans
                   if s.parent is not None and s.parent.span_id == request.context.span_id)
    (batch,) = [s for s in spans if s.name == "batch"]
    assert batch.parent is None  # a trace of its own ...
    assert {(link.context.trace_id, link.context.span_id) for link in batch.links} == {
        (s.context.trace_id, s.context.span_id) for s in requests}  # ... linked to each request it carried
    assert batch.attributes["fleet.rows"] == 3 and batch.attributes["fleet.batcher"] == "m:1"
    for name in ("preprocess", "compute"):
        (span,) = [s for s in spans if s.name == name]
        assert span.parent.span_id == batch.context.span_id and span.context.trace_id == batch.context.trace_id
    for queue in (s for s in spans if s.name == "queue"):
        assert queue.start_time <= queue.end_time == batch.start_time  # enqueued -> the batch was sent
        assert by_id[queue.parent.span_id].name == "infer"

    # Across the Ray call: the worker's span is the child of `compute`, in the batch's trace.
    (compute,) = [s for s in spans if s.name == "compute"]
    assert worker.seen == [format_traceparent(batch.context.trace_id, compute.context.span_id, 1)]
    (execute,) = worker.exporter.get_finished_spans()
    assert execute.name == "execute" and execute.context.trace_id == batch.context.trace_id
    assert execute.parent.span_id == compute.context.span_id and execute.parent.is_remote
    assert execute.attributes == {"fleet.model": "m", "fleet.version": 1}


async def test_a_failed_batch_span_says_so(traced):
    tracing, exporter = traced

    async def broken(inputs):
        raise RuntimeError("backend down")

    batcher = Batcher("m:1", broken, BatcherConfig(max_batch_size=8))
    batcher.tracing = tracing
    with pytest.raises(Exception, match="backend down"):
        await _request(tracing, batcher, 1.0)
    await batcher.close()
    tracing.flush()
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert batch.status.status_code is StatusCode.ERROR and "backend down" in batch.status.description


async def test_tracing_off_records_nothing_and_hands_no_traceparent(traced):
    tracing, exporter = traced
    assert setup_tracing(0.0) is None and tracing_module.active() is None  # the default: off
    worker = _Worker()
    batcher = Batcher("m:1", worker.execute, BatcherConfig(max_batch_size=8))
    assert batcher.tracing is None
    # Even with a request trace in this task's context, a batcher whose tracing is off never looks at it.
    request_trace.set(tracing.start_request(VALID))
    batch = await batcher.submit({"x": np.ones((1, 1), np.float32)})
    assert batch.batch_rows == 1
    await batcher.close()
    assert worker.seen == [None]  # the worker call carries no traceparent
    assert worker.worker.tracing.flush() == 0
    assert tracing.flush() == 0 and not exporter.get_finished_spans()


async def test_untraced_batches_of_a_traced_batcher_send_no_stale_traceparent(traced):
    tracing, exporter = traced
    worker = _Worker()
    batcher = Batcher("m:1", worker.execute, BatcherConfig(max_batch_size=8))
    batcher.tracing = tracing
    await _request(tracing, batcher, 1.0)
    await _request(None, batcher, 2.0)  # request_trace is still set in this task: the service resets it
    request_trace.set(None)
    await _request(None, batcher, 3.0)
    await batcher.close()
    assert worker.seen[0] is not None and worker.seen[-1] is None


# -- exporters and set-up ------------------------------------------------------------------------
def test_json_lines_exporter(tmp_path):
    exporter = JsonLinesSpanExporter(tmp_path / "t" / "spans.jsonl")
    tracing = Tracing(exporter, 1.0, start_thread=False)
    trace = tracing.start_request(VALID)
    trace.add("parse", trace.start_ns)
    batch = tracing.start_batch([trace], time.monotonic_ns(), rows=1)
    batch.finish("boom")
    trace.finish(model="fraud")
    tracing.shutdown()
    lines = [orjson.loads(line) for line in (tmp_path / "t" / "spans.jsonl").read_bytes().splitlines()]
    by_name = {d["name"]: d for d in lines}
    assert set(by_name) == {"infer", "parse", "batch"}
    assert by_name["infer"]["trace_id"] == TRACE and by_name["infer"]["parent_span_id"] == SPAN
    assert by_name["infer"]["attributes"] == {"fleet.model": "fraud"}
    assert by_name["parse"]["parent_span_id"] == by_name["infer"]["span_id"]
    assert by_name["batch"]["links"] == [{"trace_id": TRACE, "span_id": by_name["infer"]["span_id"]}]
    assert by_name["batch"]["status"] == "ERROR" and by_name["batch"]["error"] == "boom"


def test_make_exporter(tmp_path):
    otlp = make_exporter("http://127.0.0.1:4318")
    assert isinstance(otlp, OtlpHttpExporter) and otlp.url == "http://127.0.0.1:4318/v1/traces"
    assert make_exporter("https://collector/otlp/v1/traces").url == "https://collector/otlp/v1/traces"
    assert make_exporter("http://collector:4318/").url == "http://collector:4318/v1/traces"
    files = make_exporter(None, str(tmp_path), "ingress")
    assert isinstance(files, JsonLinesSpanExporter) and files.path.parent == tmp_path
    for bad in ("ftp://x", "127.0.0.1:4318", "http://", "grpc://collector:4317", "http:/x"):
        with pytest.raises(ValueError, match="otlp_endpoint"):
            make_exporter(bad)
    with pytest.raises(ValueError, match="trace_dir"):
        make_exporter(None, None)


def test_setup_tracing_once_per_process(tmp_path):
    try:
        first = setup_tracing(0.5, None, str(tmp_path), component="ingress")
        assert tracing_module.active() is first and first.sample_ratio == 0.5
        assert setup_tracing(1.0, None, str(tmp_path)) is first
        assert Batcher("m:1", None, BatcherConfig(max_batch_size=1)).tracing is first
    finally:
        tracing_module.shutdown_tracing()
    assert tracing_module.active() is None


def test_otlp_encoding_decodes_as_the_collector_reads_it():
    """fleet's hand-written OTLP protobuf, read back with the protocol's own messages: the same spans as the
    SDK's ReadableSpans of the same records."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan, Status as PbStatus

    tracing = Tracing(InMemorySpanExporter(), 1.0, component="ingress", start_thread=False)
    request = tracing.start_request(VALID)
    request.add("parse", request.start_ns)
    local = tracing.start_request()  # a root: no parent
    batch = tracing.start_batch([request, local], time.monotonic_ns(), batcher="m:1", rows=3, ratio=0.5, held=True)
    _, compute_id = batch.child_ids()
    batch.add("compute", batch.start_ns, 0, compute_id)
    batch.finish(RuntimeError("worker gone ü"))
    request.finish(model="fraud", version="3", offset=-7, request_id=None)
    local.finish()
    traces = list(tracing._done)
    offset = time.time_ns() - time.monotonic_ns()
    decoded = ExportTraceServiceRequest.FromString(encode_traces(traces, offset, tracing.resource))

    (resource_spans,) = decoded.resource_spans
    resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert resource["service.name"] == "fleet" and resource["fleet.component"] == "ingress"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "fleet"
    got = list(scope_spans.spans)
    sdk = tracing._spans(traces)
    assert len(got) == len(sdk) == 5
    for pb, span in zip(got, sdk):
        assert pb.name == span.name
        assert pb.trace_id == span.context.trace_id.to_bytes(16, "big")
        assert pb.parent_span_id == (span.parent.span_id.to_bytes(8, "big") if span.parent else b"")
        if span.name != "parse":  # a child's id is drawn when it is exported (compute's was handed out)
            assert pb.span_id == span.context.span_id.to_bytes(8, "big")
        assert abs(pb.start_time_unix_nano - span.start_time) < 10_000_000  # the offsets are taken apart
        assert pb.end_time_unix_nano - pb.start_time_unix_nano == span.end_time - span.start_time
        assert pb.kind == span.kind.value + 1
        assert {kv.key for kv in pb.attributes} == set(span.attributes)
        assert [(ln.trace_id, ln.span_id) for ln in pb.links] == [
            (ln.context.trace_id.to_bytes(16, "big"), ln.context.span_id.to_bytes(8, "big")) for ln in span.links]
        assert pb.status.code == span.status.status_code.value
        assert pb.status.message == (span.status.description or "")
    by_name = {pb.name: pb for pb in got}
    infer, batch_pb = [pb for pb in got if pb.name == "infer"][0], by_name["batch"]
    assert infer.kind == PbSpan.SPAN_KIND_SERVER and by_name["parse"].kind == PbSpan.SPAN_KIND_INTERNAL
    assert infer.flags & 0x300 == 0x300  # its parent (the client's span) is remote
    assert by_name["parse"].flags & 0x300 == 0x100
    attributes = {kv.key: kv.value for kv in infer.attributes}
    assert attributes["fleet.model"].string_value == "fraud" and attributes["fleet.offset"].int_value == -7
    assert "fleet.request_id" not in attributes  # None: left out
    batch_attributes = {kv.key: kv.value for kv in batch_pb.attributes}
    assert batch_attributes["fleet.rows"].int_value == 3 and batch_attributes["fleet.ratio"].double_value == 0.5
    assert batch_attributes["fleet.held"].bool_value is True
    assert len(batch_pb.links) == 2
    assert by_name["compute"].span_id == compute_id.to_bytes(8, "big")
    assert batch_pb.status.code == PbStatus.STATUS_CODE_ERROR
    assert batch_pb.status.message == "RuntimeError: worker gone ü"
    assert infer.status.code == PbStatus.STATUS_CODE_UNSET


def test_flush_sends_records_to_an_otlp_exporter_and_counts_failures():
    sent = []

    class Collector:  # an OtlpHttpExporter without the HTTP
        ok = True

        def export_traces(self, traces, offset_ns, resource):
            sent.append(encode_traces(traces, offset_ns, resource))
            return self.ok

        def shutdown(self):
            pass

    collector = Collector()
    tracing = Tracing(collector, 1.0, start_thread=False, max_export_traces=2)
    for _ in range(3):
        trace = tracing.start_request()
        trace.add("parse", trace.start_ns)
        trace.finish()
    assert tracing.flush() == 6 and len(sent) == 2  # two requests: 2 traces, then 1
    collector.ok = False
    tracing.start_request().finish()
    assert tracing.flush() == 1 and tracing.failed == 1


class _Collector:
    """A real OTLP/HTTP endpoint on loopback (http.server, HTTP/1.1 keep-alive): counts connections and bodies,
    answers `status`, closes the connection after each answer while `close` is set."""

    def __init__(self):
        import http.server
        import threading

        collector = self
        self.connections, self.bodies, self.status, self.close, self.sockets = 0, [], 200, False, []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                collector.connections += 1
                collector.sockets.append(self.request)
                super().setup()

            def do_POST(self):  # noqa: N802 - http.server's name
                collector.bodies.append((self.path, self.headers["Content-Type"],
                                         self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(collector.status)
                self.send_header("Content-Length", "0")
                if collector.close:
                    self.send_header("Connection", "close")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: never taken
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_otlp_exporter_keeps_its_connection_and_opens_a_new_one_when_the_collector_closed_it():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = _Collector()
    exporter = OtlpHttpExporter(collector.endpoint, timeout_s=5.0)
    tracing = Tracing(exporter, 1.0, start_thread=False)
    try:
        for _ in range(3):
            trace = tracing.start_request(VALID)
            trace.add("parse", trace.start_ns)
            trace.finish(model="fraud")
            assert tracing.flush() == 2
        assert collector.connections == 1 and len(collector.bodies) == 3  # one kept-alive connection
        path, content_type, body = collector.bodies[0]
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        spans = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
        assert [s.name for s in spans] == ["infer", "parse"] and spans[0].trace_id.hex() == TRACE

        collector.close = True  # the collector says it closes after its answer: the next export connects anew
        tracing.start_request().finish()
        assert tracing.flush() == 1
        tracing.start_request().finish()
        assert tracing.flush() == 1 and tracing.failed == 0 and collector.connections == 2

        collector.close = False
        tracing.start_request().finish()
        assert tracing.flush() == 1 and collector.connections == 3  # kept again
        collector.sockets[-1].shutdown(socket.SHUT_RDWR)  # the collector drops it without a word (an idle timeout)
        tracing.start_request().finish()
        assert tracing.flush() == 1 and tracing.failed == 0 and collector.connections == 4

        collector.close, collector.status = False, 503  # refused: counted as failed, not retried
        tracing.start_request().finish()
        assert tracing.flush() == 1 and tracing.failed == 1 and len(collector.bodies) == 8
    finally:
        collector.stop()
    tracing.start_request().finish()  # the collector is gone: a failure, never an exception
    assert tracing.flush() == 1 and tracing.failed == 2
    exporter.shutdown()
