"""The native gRPC transport's own edge cases (native._h2 under serving/grpc/native_server.py), with real clients
on loopback: grpc channels, tritonclient, and a raw HTTP/2 client (hyper-h2) or raw socket that says what a gRPC
library would not (garbage, a bad preface, a non-gRPC content-type, the compressed flag, an oversized declared
message, a unary call of zero or two messages). The RPCs themselves: tests/unit/test_grpc.py, on both listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import tritonclient.grpc.aio as tgrpc
from tritonclient.grpc import service_pb2 as pb

from serving.grpc.handlers import SERVICE
from serving.grpc.native_server import NativeGrpcListener, native_transport_available
from serving.grpc.server import GrpcListener, make_grpc_listener
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.service import InferenceService
from test_grpc import _listening, _Worker

needs_native = pytest.mark.skipif(not native_transport_available(), reason="native._h2 unavailable or FLEET_PURE_PYTHON")
MAX_MESSAGE = 1 << 16


@contextlib.asynccontextmanager
async def _native(max_concurrent_rpcs: int = 64, graceful_shutdown_s: float = 1.0, host: str = "127.0.0.1",
                  dims: tuple = (2,)):
    """(listener, service, worker, port): the native listener over a scripted model `m` on a free port."""
    worker = _Worker()
    cfg = make_config("m", [TensorSpec("x", "FP32", dims)], [TensorSpec("y", "FP32", dims)], max_batch_size=8,
                      parameters={"fleet.max_inflight_batches": "8"})
    service = InferenceService({"m": (spec_from_config(cfg), cfg, worker)}, ServingOptions(repository="/nonexistent"))
    await service.refresh()
    listener = await _listening(NativeGrpcListener, service, host, max_message_bytes=MAX_MESSAGE,
                                max_concurrent_rpcs=max_concurrent_rpcs, graceful_shutdown_s=graceful_shutdown_s)
    port = listener.port
    try:
        yield listener, service, worker, port
    finally:
        worker.gate.set()
        await listener.stop()
        await service.close()


def _infer_request(first: float = 0.0) -> bytes:
    return pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[first, 1]))]
    ).SerializeToString()


def _frame(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


def _h2_call(port: int, body: bytes, *, method: str = "ServerLive", content_type: str = "application/grpc",
             end: bool = True, extra: tuple = (), timeout_s: float = 5.0) -> dict:
    """One call by a raw HTTP/2 client (blocking: run it in a thread). {"headers", "data", "trailers", "reset"}."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{method}"), (":authority", "fleet"),
               ("content-type", content_type), ("te", "trailers"), *extra]
    conn.send_headers(sid, headers, end_stream=end and not body)
    if body:
        conn.send_data(sid, body, end_stream=end)
    sock.sendall(conn.data_to_send())
    out = {"headers": None, "data": b"", "trailers": None, "reset": None}
    done = False
    try:
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    out["headers"] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    out["data"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.TrailersReceived):
                    out["trailers"] = dict(event.headers)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    if isinstance(event, h2.events.StreamReset):
                        out["reset"] = event.error_code
                    done = True
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return out


def _grpc_status(result: dict) -> tuple[int, str]:
    """(grpc-status, grpc-message) of a call, from its trailers or a trailers-only answer."""
    where = result["trailers"] or result["headers"] or {}
    return int(where["grpc-status"]), where.get("grpc-message", "")


@needs_native
async def test_the_transport_answers_the_framing_errors_a_grpc_library_never_makes():
    async with _native() as (listener, _, _, port):
        ok = await asyncio.to_thread(_h2_call, port, _frame(b""))
        assert ok["headers"][":status"] == "200" and _grpc_status(ok) == (0, "") and len(ok["data"]) == 5 + 2
        cases = [  # (what, body, end, method, content-type, (grpc-status, details fragment))
            ("no message", b"", True, "ServerLive", "application/grpc", (3, "sent none")),
            ("two messages", _frame(b"") * 2, True, "ServerLive", "application/grpc", (3, "sent more")),
            ("ended inside a message", _frame(b"abcdef")[:7], True, "ServerLive", "application/grpc", (3, "inside")),
            ("compressed flag", _frame(b"\x08\x01", flag=1), True, "ServerLive", "application/grpc",
             (12, "compressed messages are not supported")),
            # declared larger than max_message_bytes: refused at once, before the client sent (or the server read) it
            ("oversized", struct.pack(">BI", 0, MAX_MESSAGE + 1) + b"\x0a", False, "ModelInfer", "application/grpc",
             (8, "larger than max")),
            ("unknown method", _frame(b""), True, "NoSuchRpc", "application/grpc+proto", (12, "Method not found")),
            ("malformed protobuf", _frame(b"\xff\xff"), True, "ModelInfer", "application/grpc", (3, "malformed")),
        ]
        for what, body, end, method, ctype, (status, fragment) in cases:
            got = await asyncio.to_thread(_h2_call, port, body, method=method, content_type=ctype, end=end)
            code, details = _grpc_status(got)
            assert code == status and fragment in details, (what, got)
        plain = await asyncio.to_thread(_h2_call, port, b"{}", content_type="application/json")
        assert plain["headers"][":status"] == "415" and "grpc-status" not in plain["headers"]
        timed = await asyncio.to_thread(_h2_call, port, _frame(b""), extra=(("grpc-timeout", "soon"),))
        assert _grpc_status(timed)[0] == 3
        stats = listener.stats()
        assert stats["calls_refused"] >= 7 and stats["connections_refused"] == 0
        # the listener is untouched by all of it
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert await client.is_server_live()
        finally:
            await client.close()


def _raw_socket(port: int, payload: bytes) -> bytes:
    """What the server answers `payload` before it closes the connection (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk


@needs_native
async def test_garbage_and_a_bad_preface_close_that_connection_and_nothing_else():
    async with _native() as (listener, _, _, port):
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert await client.is_server_live()  # a connection open before, and after
            for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096),
                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x09\x00\x00\x00\x00\x01" * 50):
                await asyncio.wait_for(asyncio.to_thread(_raw_socket, port, payload), 5)
            assert listener.stats()["connections_failed"] >= 3
            assert await client.is_server_live() and listener.alive()
        finally:
            await client.close()


@needs_native
async def test_a_call_the_client_cancels_stops_its_work_and_a_late_answer_goes_nowhere():
    async with _native() as (listener, service, worker, port):
        worker.gate.clear()  # the batch is held: the call waits in the model
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/ModelInfer")(_infer_request())
            deadline = time.monotonic() + 5
            while listener.in_flight() < 1:
                assert time.monotonic() < deadline, "the call never reached the handler"
                await asyncio.sleep(0.01)
            call.cancel()
            while listener.in_flight() > 0 or listener.stats()["calls_cancelled"] < 1:
                assert time.monotonic() < deadline, f"the cancelled call is still served: {listener.stats()}"
                await asyncio.sleep(0.01)
            worker.gate.set()  # the batch ends after its caller went: nothing answers into the freed stream
            await asyncio.sleep(0.1)
            answer = pb.ModelInferResponse.FromString(await channel.unary_unary(f"/{SERVICE}/ModelInfer")(
                _infer_request()))
            assert answer.model_name == "m" and listener.alive()


@needs_native
async def test_the_server_side_deadline_ends_a_held_call_deadline_exceeded():
    async with _native() as (listener, _, worker, port):
        worker.gate.clear()
        started = time.monotonic()
        got = await asyncio.to_thread(_h2_call, port, _frame(_infer_request()), method="ModelInfer",
                                      extra=(("grpc-timeout", "200m"),))
        assert _grpc_status(got)[0] == 4 and 0.15 < time.monotonic() - started < 3.0, got
        assert listener.in_flight() == 0


@needs_native
async def test_streams_per_connection_and_calls_per_replica_are_bounded():
    async with _native(max_concurrent_rpcs=2) as (listener, _, worker, port):
        worker.gate.clear()
        peak = 0
        # One channel: SETTINGS_MAX_CONCURRENT_STREAMS = 2, so the client holds its other 4 calls itself.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
            calls = [asyncio.ensure_future(infer(_infer_request())) for _ in range(6)]
            for _ in range(30):
                await asyncio.sleep(0.01)
                peak = max(peak, listener.in_flight())
            assert peak == 2, peak
            # A second connection's call beyond the replica's 2: refused, not queued.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await other.unary_unary(f"/{SERVICE}/ModelInfer")(_infer_request(), timeout=5)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            worker.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert len(answers) == 6 and all(pb.ModelInferResponse.FromString(a).model_name == "m" for a in answers)


def _stream_without_reading(port: int, message: bytes, most: int, timeout_s: float = 60.0) -> dict:
    """Send `message` on one ModelStreamInfer stream up to `most` times while never acknowledging the answers
    (no WINDOW_UPDATE: the server's backlog grows), until the server resets the stream (blocking).
    {"sent": messages sent, "reset": the reset's error code or None, "received": answer bytes received}."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/ModelStreamInfer"),
                            (":authority", "fleet"), ("content-type", "application/grpc"), ("te", "trailers")])
    sock.sendall(conn.data_to_send())
    frame = _frame(message)
    out = {"sent": 0, "reset": None, "received": 0}
    deadline = time.monotonic() + timeout_s
    pending = b""
    try:
        while out["reset"] is None and time.monotonic() < deadline:
            if not pending and out["sent"] < most:
                pending, out["sent"] = frame, out["sent"] + 1
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size) if pending else 0
            if room > 0:
                conn.send_data(sid, pending[:room])
                pending = pending[room:]
                sock.sendall(conn.data_to_send())
                continue
            data = sock.recv(65536)  # the server's window updates, its answers (never acknowledged), its reset
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    out["received"] += len(event.data)
                elif isinstance(event, h2.events.StreamReset):
                    out["reset"] = event.error_code
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return out


@needs_native
async def test_a_stream_whose_client_stops_reading_is_reset_once_64_mib_of_answers_wait():
    rows = 16_000  # 64,000 bytes a message and an answer, under MAX_MESSAGE
    message = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, rows])], raw_input_contents=[bytes(4 * rows)]).SerializeToString()
    async with _native(dims=(-1,)) as (listener, _, worker, port):
        refused = listener.stats()["calls_refused"]
        got = await asyncio.to_thread(_stream_without_reading, port, message, 1_400)
        assert got["reset"] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, got
        # The answers the client never took: about 64 MiB held (1,049 answers of 64,000 bytes), then the reset.
        assert 1_050 <= got["sent"] < 1_400 and got["received"] <= 65_535, got
        assert listener.stats()["calls_refused"] == refused + 1
        # the stream's requests still being answered are cancelled at the loop's next poll (later on a loaded machine)
        deadline = time.monotonic() + 5.0
        while listener.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert listener.in_flight() == 0
        answer = pb.ModelInferResponse.FromString(await asyncio.to_thread(_h2_unary_infer, port))
        assert answer.model_name == "m" and listener.alive()


def _h2_unary_infer(port: int) -> bytes:
    got = _h2_call(port, _frame(pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 2])], raw_input_contents=[bytes(8)]).SerializeToString()),
        method="ModelInfer")
    assert _grpc_status(got) == (0, ""), got
    return got["data"][5:]


@needs_native
async def test_stop_lets_calls_in_flight_finish_refuses_new_connections_and_closes_the_rest_at_its_deadline():
    async with _native(graceful_shutdown_s=5.0) as (listener, _, worker, port):
        worker.gate.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
            held = [asyncio.ensure_future(infer(_infer_request(), timeout=10)) for _ in range(2)]
            while listener.in_flight() < 2:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(listener.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done() and not listener.alive()
            with pytest.raises(OSError):  # the port is closed
                await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 2)
            worker.gate.set()
            answers = await asyncio.gather(*held)
            assert all(pb.ModelInferResponse.FromString(a).model_name == "m" for a in answers)
            await asyncio.wait_for(stopping, 5)
    # past the grace period the calls still held are cut and stop() returns
    async with _native(graceful_shutdown_s=0.3) as (listener, _, worker, port):
        worker.gate.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            held = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/ModelInfer")(_infer_request(), timeout=10))
            while listener.in_flight() < 1:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.wait_for(listener.stop(), 5)
            assert time.monotonic() - started < 2.0 and listener.in_flight() == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await held
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@needs_native
async def test_ipv6_loopback_and_the_peer_address():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        async with _native(host="::1") as (_, service, _, port):
            client = tgrpc.InferenceServerClient(f"[::1]:{port}")
            try:
                assert await client.is_server_live()
                result = await client.infer("m", [_tensor()])
                assert result.as_numpy("y").tolist() == [[0.0, 2.0]]
            finally:
                await client.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")


def _tensor() -> tgrpc.InferInput:
    import numpy as np

    tensor = tgrpc.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.asarray([[0, 1]], np.float32))
    return tensor


def test_the_native_listener_is_chosen_when_built_and_grpc_aio_when_asked_or_pure_python():
    service = InferenceService({}, ServingOptions(repository="/nonexistent"))
    kw = dict(max_message_bytes=1024, max_concurrent_rpcs=4, graceful_shutdown_s=1.0)
    chosen = make_grpc_listener(service, "127.0.0.1", 1, transport="native", **kw)
    assert isinstance(chosen, NativeGrpcListener if native_transport_available() else GrpcListener)
    assert isinstance(make_grpc_listener(service, "127.0.0.1", 1, transport="grpcio", **kw), GrpcListener)
    with pytest.raises(ValueError, match="grpc transport"):
        make_grpc_listener(service, "127.0.0.1", 1, transport="h3", **kw)
    code = ("from serving.grpc.server import make_grpc_listener, GrpcListener\n"
            "from serving.service import InferenceService\nfrom serving.options import ServingOptions\n"
            "s = InferenceService({}, ServingOptions(repository='/x'))\n"
            "l = make_grpc_listener(s, '127.0.0.1', 1, transport='native', max_message_bytes=1, max_concurrent_rpcs=1,"
            " graceful_shutdown_s=1)\nprint(type(l).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FLEET_PURE_PYTHON": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "GrpcListener", out.stderr[-2000:]
