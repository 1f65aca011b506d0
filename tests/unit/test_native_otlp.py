"""The OTLP span encoder: compiled (`native._core.otlp_spans`) and Python (`serving.telemetry.otlp.python_spans`)
write the same bytes for the same trace records, and the compiled one refuses what is not a record."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from native import _core
from serving.telemetry.otlp import python_spans
from serving.telemetry.tracing import Tracing

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def finished_traces() -> list:
    """Requests (a client's parent, roots), a linked batch with an error, attributes of every kind, children
    with handed-out ids (so both encoders write the same bytes)."""
    tracing = Tracing(InMemorySpanExporter(), 1.0, component="ingress", start_thread=False)
    request = tracing.start_request(VALID)
    request.add("parse", request.start_ns, 0, 11)
    request.add("queue", request.start_ns + 5, request.start_ns + 900, 2**64 - 1)
    local = tracing.start_request()
    local.add("encodé" * 30, local.start_ns, 0, 7)  # a long, non-ASCII name: a 2-byte length
    batch = tracing.start_batch([request, local], time.monotonic_ns(), batcher="m:1", rows=3, ratio=0.5, held=True,
                                big=2**70 + 5, negative=-7, listed=[1, "a"], nothing=None)
    _, compute_id = batch.child_ids()
    batch.add("compute", batch.start_ns, 0, compute_id)
    batch.finish(RuntimeError("worker gone ü"))
    request.finish(model="fraud", version="3", request_id="r-1")
    local.finish("")  # an empty error: no status, as in Python
    return list(tracing._done)


def test_the_compiled_encoder_writes_the_python_encoders_bytes():
    traces = finished_traces()
    offset = time.time_ns() - time.monotonic_ns()
    assert _core.otlp_spans(traces, offset) == python_spans(traces, offset)
    assert _core.otlp_spans([], offset) == b""


def test_children_without_an_id_get_a_random_nonzero_one():
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    tracing = Tracing(InMemorySpanExporter(), 1.0, start_thread=False)
    trace = tracing.start_request()
    for _ in range(50):
        trace.add("parse", trace.start_ns)
    trace.finish()
    scope = ScopeSpans.FromString(_core.otlp_spans(list(tracing._done), 0))
    ids = [s.span_id for s in scope.spans[1:]]
    assert len(ids) == 50 and len(set(ids)) == 50 and all(len(i) == 8 and i != bytes(8) for i in ids)
    assert all(s.parent_span_id == trace.span_id.to_bytes(8, "big") for s in scope.spans[1:])


@pytest.mark.parametrize("bad, message", [
    ("not a list", "traces must be a list"),
    ([object()], "trace_id"),
])
def test_what_is_not_a_list_of_records_is_a_named_error(bad, message):
    with pytest.raises((TypeError, AttributeError), match=message):
        _core.otlp_spans(bad, 0)


def test_a_malformed_child_is_a_type_error():
    traces = finished_traces()
    traces[0].children.append(("parse", 1))
    with pytest.raises(TypeError, match="a child must be"):
        _core.otlp_spans(traces, 0)


def test_an_id_too_large_is_an_overflow_error_in_both_encoders():
    traces = finished_traces()
    traces[0].trace_id = 2**128
    with pytest.raises(OverflowError):
        _core.otlp_spans(traces, 0)
    with pytest.raises(OverflowError):
        python_spans(traces, 0)
