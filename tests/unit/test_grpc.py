"""fleet's gRPC front end in this process: both listeners (the native transport, native._h2, and grpc.aio) on
loopback, `tritonclient.grpc.aio` as the client, the same `InferenceService` as HTTP over a scripted worker (a live
cluster: tests/integration/test_grpc.py). The native transport's own edge cases: tests/unit/test_grpc_transport.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from cluster.ports import free_ports
from serving.auth import key_digest
from serving.grpc.codec import decode_infer_request, encode_infer_response, response_message
from serving.grpc.handlers import SERVICE
from serving.grpc.native_server import NativeGrpcListener, native_transport_available
from serving.grpc.server import GrpcListener
from serving.http_api import build_handler
from serving.http_server import HttpRequest
from serving.limits import RequestLimits
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.protocol import decode_request
from serving.service import InferenceService

KEY, ADMIN = "grpc-key-1", "grpc-admin-token"
# Every test that serves runs on both listeners (the native one only where native._h2 is built and allowed).
LISTENERS = [pytest.param(GrpcListener, id="grpcio"), pytest.param(
    NativeGrpcListener, id="native",
    marks=pytest.mark.skipif(not native_transport_available(), reason="native._h2 unavailable or FLEET_PURE_PYTHON"))]


@pytest.fixture(params=LISTENERS)
def listener_type(request):
    return request.param


LIMITS = RequestLimits(max_tensor_elements=1000, max_string_bytes=64, max_json_depth=0, max_batch_rows=0)


class _Worker:
    """Doubles x; each batch may be held (`gate`) or delayed by its first value (ms), to reorder answers."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.gate.set()
        self.batches = 0

    async def infer(self, version: int, inputs: dict) -> dict:
        self.batches += 1
        await self.gate.wait()
        delay = float(inputs["x"].ravel()[0])
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        return {"y": inputs["x"] * 2}

    async def status(self) -> dict:
        return {"versions": [1]}


async def _listening(listener_type, service: InferenceService, host: str = "127.0.0.1", **options):
    """A started listener of `listener_type` on a free port (`.port`)."""
    for attempt in range(3):  # a port taken between choosing and binding: another
        (port,) = free_ports(1)
        listener = listener_type(service, host, port, **options)
        try:
            await listener.start()
            return listener
        except OSError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def _serving(listener_type=GrpcListener, **options):
    """(tritonclient.grpc.aio client, raw channel, service, worker, http handler) over a listener on a free port."""
    worker = _Worker()
    cfg = make_config("m", [TensorSpec("x", "FP32", (2,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8,
                      parameters={"fleet.max_inflight_batches": "4"})
    service = InferenceService({"m": (spec_from_config(cfg), cfg, worker)},
                               ServingOptions(repository="/nonexistent", **options))
    await service.refresh()
    listener = await _listening(listener_type, service, max_message_bytes=1 << 16, max_concurrent_rpcs=64,
                                graceful_shutdown_s=1.0)
    port = listener.port
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield client, channel, service, worker, build_handler(service)
    finally:
        await client.close()
        await channel.close()
        await listener.stop()
        await service.close()


def _x(rows: list[list[float]]) -> tgrpc.InferInput:
    arr = np.asarray(rows, np.float32)
    tensor = tgrpc.InferInput("x", list(arr.shape), "FP32")
    tensor.set_data_from_numpy(arr)
    return tensor


async def _status(call) -> tuple[grpc.StatusCode, str, dict]:
    """(code, details, trailing metadata) of a raw call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details(), dict(info.value.trailing_metadata() or ())


def _raw(channel, method: str):
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def test_health_metadata_config_statistics_index_and_inference_through_tritonclient(listener_type):
    async with _serving(listener_type) as (client, _, _, _, _):
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("m") and not await client.is_model_ready("m", "7")
        meta = await client.get_server_metadata(as_json=True)
        assert meta["name"] == "fleet" and "binary_tensor_data" in meta["extensions"]
        model = await client.get_model_metadata("m", as_json=True)
        assert model["versions"] == ["1"] and model["inputs"][0] == {"name": "x", "datatype": "FP32",
                                                                      "shape": ["-1", "2"]}
        config = await client.get_model_config("m", as_json=True)
        assert config["config"]["name"] == "m" and config["config"]["max_batch_size"] == 8
        index = await client.get_model_repository_index(as_json=True)
        assert index["models"] == [{"name": "m", "version": "1", "state": "READY"}]
        result = await client.infer("m", [_x([[1, 2], [3, 4]])], request_id="req-7")
        np.testing.assert_array_equal(result.as_numpy("y"), [[2, 4], [6, 8]])
        assert result.get_response().id == "req-7" and result.get_response().model_version == "1"
        stats = await client.get_inference_statistics("m", as_json=True)
        assert stats["model_stats"][0]["name"] == "m"


async def test_errors_carry_the_http_message_and_the_matching_status_code(listener_type):
    async with _serving(listener_type) as (client, _, _, _, handler):
        cases = [
            ("nope", [_x([[0, 0]])], grpc.StatusCode.NOT_FOUND, "/v2/models/nope/infer"),
            ("m", [_x([[0, 0, 0]])], grpc.StatusCode.INVALID_ARGUMENT, "/v2/models/m/infer"),
        ]
        for model, inputs, code, path in cases:
            with pytest.raises(InferenceServerException) as info:
                await client.infer(model, inputs)
            arr = inputs[0]._get_content()
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(inputs[0].shape()),
                                           "data": np.frombuffer(arr, np.float32).tolist()}]}).encode()
            status, _, answer = await handler(HttpRequest("POST", path, b"", [], body))
            assert info.value.status() == str(code) and info.value.message() == json.loads(answer)["error"], \
                (info.value, answer)
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", [_x([[0, 0]])], model_version="9")
        assert info.value.status() == "StatusCode.NOT_FOUND" and "no version 9" in info.value.message()


async def test_a_full_queue_is_unavailable_with_a_retry_hint_and_a_deadline_ends_a_held_request(listener_type):
    async with _serving(listener_type, max_queue_size=1) as (client, channel, service, worker, _):
        worker.gate.clear()  # batches held: 4 in flight (fleet.max_inflight_batches), the next fills the queue of 1
        # One held call at a time until one waits in the queue: calls that arrive together on a loaded machine
        # can find the queue full before the batcher took the first of them (refused, not held), so a fixed
        # number of calls may leave every held one in flight and the queue empty.
        held = []
        deadline = asyncio.get_running_loop().time() + 10
        while service.queue_depths().get(("m", "1"), 0) < 1:
            assert asyncio.get_running_loop().time() < deadline, "the held requests never filled the queue"
            if sum(not h.done() for h in held) < 5:
                held.append(asyncio.ensure_future(client.infer("m", [_x([[0, len(held)]])])))
            await asyncio.sleep(0.05)
        request = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[0, 1]))])
        code, details, trailers = await _status(_raw(channel, "ModelInfer")(request.SerializeToString()))
        assert code == grpc.StatusCode.UNAVAILABLE and "queue" in details and int(trailers["grpc-retry-pushback-ms"]) >= 1000
        worker.gate.set()
        done = await asyncio.gather(*held, return_exceptions=True)
        assert any(not isinstance(d, Exception) for d in done)
    async with _serving(listener_type) as (client, _, _, worker, _):
        worker.gate.clear()
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", [_x([[0, 0]])], client_timeout=0.3)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        worker.gate.set()


async def test_keys_travel_as_authorization_metadata_and_admin_rpcs_need_the_token(listener_type):
    options = dict(api_key_digests=(key_digest(KEY),), admin_token_digest=key_digest(ADMIN))
    async with _serving(listener_type, **options) as (client, channel, _, _, _):
        assert await client.is_server_live()  # health stays open
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            with pytest.raises(InferenceServerException) as info:
                await client.infer("m", [_x([[0, 0]])], headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED", info.value
        result = await client.infer("m", [_x([[1, 1]])], headers={"authorization": f"Bearer {KEY}"})
        np.testing.assert_array_equal(result.as_numpy("y"), [[2, 2]])
        with pytest.raises(InferenceServerException) as info:
            await client.get_model_metadata("m")
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:  # an inference key may not unload
            await client.unload_model("m", headers={"authorization": f"Bearer {KEY}"})
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        code, _, trailers = await _status(_raw(channel, "ModelMetadata")(pb.ModelMetadataRequest(
            name="m").SerializeToString()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and trailers["www-authenticate"].startswith("Bearer")


async def test_the_rate_limit_is_resource_exhausted_with_a_retry_hint(listener_type):
    async with _serving(listener_type, rate_limit_rps=1.0, rate_limit_burst=1) as (_, channel, _, _, _):
        request = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[0, 1]))])
        await _raw(channel, "ModelInfer")(request.SerializeToString())
        code, details, trailers = await _status(_raw(channel, "ModelInfer")(request.SerializeToString()))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in details and "grpc-retry-pushback-ms" in trailers


async def test_triton_features_fleet_lacks_are_unimplemented_and_malformed_protobuf_is_invalid_argument(listener_type):
    async with _serving(listener_type) as (_, channel, _, _, _):
        for method in ("SystemSharedMemoryStatus", "CudaSharedMemoryRegister", "TraceSetting", "LogSettings"):
            code, details, _ = await _status(_raw(channel, method)(b""))
            assert code == grpc.StatusCode.UNIMPLEMENTED and "fleet does not support" in details
        code, _, _ = await _status(channel.unary_unary("/inference.GRPCInferenceService/NoSuchRpc")(b""))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        for method in ("ModelInfer", "ModelMetadata", "ModelReady"):
            code, details, _ = await _status(_raw(channel, method)(b"\xff\xff\xff\xff\x0f"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
        code, _, _ = await _status(_raw(channel, "ModelInfer")(b"\x0a" + b"\x00" * (1 << 17)))  # over 64 KiB
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_stream_answers_in_request_order_with_the_empty_final_response_when_asked(listener_type):
    async with _serving(listener_type) as (_, channel, _, _, _):
        # The first request's batch takes 150 ms, the later ones none: their answers still come after it.
        requests = []
        for i, delay in enumerate([150, 0, 0, 0]):
            msg = pb.ModelInferRequest(model_name="m", id=f"s{i}", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[delay, i]))])
            if i == 3:
                msg.parameters["triton_enable_empty_final_response"].bool_param = True
            requests.append(msg)
        requests.append(pb.ModelInferRequest(model_name="nope", id="bad", inputs=requests[0].inputs))
        call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer", request_serializer=pb.ModelInferRequest.
                                     SerializeToString, response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = [a async for a in call(iter(requests))]
        ids = [a.infer_response.id for a in answers]
        assert ids == ["s0", "s1", "s2", "s3", "s3", ""], answers
        assert not any(a.error_message for a in answers[:5]) and "unknown model 'nope'" in answers[5].error_message
        out = np.frombuffer(answers[1].infer_response.raw_output_contents[0], "<f4")
        np.testing.assert_array_equal(out, [0, 2])
        final = answers[4].infer_response
        assert final.parameters["triton_final_response"].bool_param and not final.outputs
        assert not answers[3].infer_response.parameters["triton_final_response"].bool_param


def test_raw_and_typed_contents_decode_to_the_same_request_as_http_json():
    arr = np.array([[1.5, -2.0], [0.0, 3.25]], np.float32)
    raw = pb.ModelInferRequest(model_name="m", id="r", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[2, 2])], raw_input_contents=[arr.tobytes()])
    typed = pb.ModelInferRequest(model_name="m", id="r", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[2, 2], contents=pb.InferTensorContents(fp32_contents=arr.ravel()))])
    http = decode_request(json.dumps({"id": "r", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                                              "data": arr.ravel().tolist()}]}).encode())
    for msg in (raw, typed):
        got = decode_infer_request(msg, LIMITS)
        assert got.id == http.id and got.inputs[0].shape == http.inputs[0].shape
        np.testing.assert_array_equal(got.inputs[0].data, http.inputs[0].data)
    words = np.array([b"ab", b"", b"\xff"], dtype=object)
    msg = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="s", datatype="BYTES", shape=[3], contents=pb.InferTensorContents(bytes_contents=list(words)))])
    assert decode_infer_request(msg, LIMITS).inputs[0].data.tolist() == words.tolist()
    response = response_message(encode_infer_response("m", "1", [("s", "BYTES", words, True)], "r"))
    assert response.raw_output_contents[0] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x01\x00\x00\x00\xff"


def _reference_encoding(model: str, version: str, outputs: list, request_id: str | None) -> bytes:
    """What protobuf's own serializer makes of the same answer."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for name, datatype, arr, _ in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes() if datatype != "BYTES"
            else b"".join(len(w).to_bytes(4, "little") + w for w in arr.ravel()))
    return response.SerializeToString()


@pytest.mark.parametrize("model, version, outputs, request_id", [
    ("fraud", "1", [("probability", "FP32", np.array([[0.25]], np.float32), True)], None),
    # lengths past one varint byte (a long name and id, 84,000 bytes of data), two outputs, an empty string left out
    ("m" * 300, "", [("a", "FP32", np.arange(21_000, dtype=np.float32).reshape(300, 70), True),
                     ("b", "INT64", np.arange(5), True)], "x" * 200),
    ("m", "12", [("s", "BYTES", np.array([b"ab", b"", b"\xff"], dtype=object), True),
                 ("empty", "FP64", np.zeros((0, 3)), True), ("scalar", "FP32", np.array(3.0, np.float32), True)], "r"),
    # big-endian, Fortran-ordered and strided arrays: little-endian, row-major bytes all the same
    ("m", "1", [("be", "FP32", np.arange(6, dtype=">f4").reshape(2, 3), True),
                ("f", "FP32", np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), True),
                ("strided", "INT32", np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2], True)], "id"),
])
def test_a_response_is_encoded_to_the_bytes_protobuf_makes(model, version, outputs, request_id):
    for _ in range(2):  # the second time from the descriptors encoded the first
        assert encode_infer_response(model, version, outputs, request_id) == \
            _reference_encoding(model, version, outputs, request_id)


def test_the_encoded_output_descriptors_kept_are_bounded(monkeypatch):
    from serving.grpc import codec

    monkeypatch.setattr(codec, "_MAX_CACHED_OUTPUTS", 4)
    monkeypatch.setattr(codec, "_OUTPUTS", {})
    for rows in range(1, 11):  # a new shape per batch size
        outputs = [("y", "FP32", np.ones((rows, 2), np.float32), True)]
        assert encode_infer_response("m", "1", outputs, None) == _reference_encoding("m", "1", outputs, None)
        assert len(codec._OUTPUTS) <= 4


@pytest.mark.parametrize("tensor, raw, message", [
    (dict(datatype="FP32", shape=[2, 2]), [b"\x00" * 12], "needs 16"),
    (dict(datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[1.0])), None,
     "needs 2 elements"),
    (dict(datatype="INT8", shape=[1], contents=pb.InferTensorContents(int_contents=[300])), None, "must lie in"),
    (dict(datatype="FP16", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0])), None,
     "raw_input_contents"),
    (dict(datatype="FP32", shape=[1 << 40, 1 << 40]), [b""], "too large"),
    (dict(datatype="FP32", shape=[100, 100]), [b""], "max_tensor_elements"),
    (dict(datatype="COMPLEX", shape=[1]), [b"\x00"], "unsupported datatype"),
    (dict(datatype="FP32", shape=[1]), [], "needs contents or raw_input_contents"),
    (dict(datatype="BYTES", shape=[1]), [b"\xff\x00\x00\x00"], "past the end"),
    (dict(datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"x" * 65])), None,
     "max_string_bytes"),
])
def test_a_request_that_disagrees_with_itself_is_refused_naming_the_input(tensor, raw, message):
    from serving.errors import InvalidInput

    msg = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", **tensor)],
                               raw_input_contents=raw or [])
    with pytest.raises(InvalidInput, match=message) as info:
        decode_infer_request(msg, LIMITS)
    assert "'x'" in info.value.message or "raw_input_contents" in info.value.message
