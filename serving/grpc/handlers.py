"""Each RPC of `inference.GRPCInferenceService`, answered through the replica's `InferenceService`.

The same service, guard, limits, batchers, prediction log, rollout routing and statistics as
the HTTP routes: only the wire format differs. Requests arrive as bytes and are parsed here
(so that malformed protobuf is INVALID_ARGUMENT, not grpc's own INTERNAL "Exception
deserializing request"); answers leave as serialized messages.

Who may call what follows serving/auth.py: health and server metadata are open, the model
routes and inference follow the inference rule (the key as `authorization: Bearer <key>`
metadata), repository load/unload need the admin token. Shared memory, tracing and log
settings are Triton features fleet does not have: UNIMPLEMENTED, saying so.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from serving import admin
from serving.auth import Access, Guard
from serving.errors import FleetError, InvalidInput
from serving.fallback import FALLBACK_HEADER
from serving.grpc.codec import FINAL_RESPONSE, decode_infer_request, encode_infer_response, parameters_from_proto, \
    parse_infer_request, response_message, stream_message
from serving.grpc.status import error_status
from serving.limits import RequestLimits
from serving.rollout.routing import ROUTING_HEADER
from serving.service import EXTENSIONS, SERVER_NAME, SERVER_VERSION, InferenceService

__all__ = ["SERVICE", "build_handlers", "rpc_functions", "MAX_STREAM_PIPELINE"]

SERVICE = "inference.GRPCInferenceService"
MAX_STREAM_PIPELINE = 16  # requests of one stream read ahead of the answer being written
_UNSUPPORTED = {
    "SystemSharedMemoryStatus": "system shared memory", "SystemSharedMemoryRegister": "system shared memory",
    "SystemSharedMemoryUnregister": "system shared memory", "CudaSharedMemoryStatus": "CUDA shared memory",
    "CudaSharedMemoryRegister": "CUDA shared memory", "CudaSharedMemoryUnregister": "CUDA shared memory",
    "TraceSetting": "Triton's trace settings (fleet traces with OpenTelemetry)",
    "LogSettings": "Triton's log settings",
}


def _headers(context) -> list[tuple[bytes, bytes]]:
    """The call's metadata as the HTTP guard reads headers: (lower-case name, value) bytes."""
    raw = getattr(context, "raw_metadata", None)  # the native transport's context has them so already
    if raw is not None:
        return raw
    out = []
    for key, value in context.invocation_metadata() or ():
        out.append((key.encode("latin-1"), value if isinstance(value, bytes) else value.encode("latin-1")))
    return out


def _metadata(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    """One metadata value of a call's `_headers` by its lower-case name (the first), None when it has none."""
    key = name.encode()
    for k, value in headers:
        if k == key:
            return value.decode("latin-1")
    return None


def _client(context) -> tuple[str, int] | None:
    """The peer's (host, port) from `ipv4:1.2.3.4:5` / `ipv6:[::1]:5`, for per-address rate limits."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def _deadline_us(context) -> int | None:
    left = context.time_remaining()
    return None if left is None else max(1, int(left * 1e6))


class _Handlers:
    """The RPCs of one replica; `in_flight` counts the calls being answered (for the autoscaler)."""

    def __init__(self, service: InferenceService, guard: Guard):
        self.service = service
        self.guard = guard
        self.limits = RequestLimits.from_options(service.options)
        self.in_flight = 0
        self._check = None if guard.inference_free else guard.inference
        self.tracing = service.tracing

    async def _fail(self, context, exc: BaseException, extra: tuple = ()):
        code, details, trailers = error_status(exc)
        if trailers or extra:
            context.set_trailing_metadata(tuple(extra) + trailers)
        await context.abort(code, details)

    def _access(self, access: Access, context, headers: list[tuple[bytes, bytes]] | None = None) -> str | None:
        """The guard's check of a call (`headers`: its `_headers`, when the caller has them); the caller's key id
        for inference."""
        if access is Access.INFERENCE:
            if self._check is None:
                return None
            return self._check(_headers(context) if headers is None else headers, _client(context))
        if access is Access.ADMIN:
            self.guard.admin(_headers(context) if headers is None else headers)
        return None

    def unary(self, parse: Callable[[bytes], object], access: Access, answer) -> Callable:
        """A unary RPC: bytes in, `answer(request, context)` (a message) out; errors as statuses."""

        async def call(data: bytes, context) -> bytes:
            self.in_flight += 1
            try:
                self._access(access, context)
                try:
                    request = parse(data)
                except Exception as exc:  # noqa: BLE001 - malformed protobuf of any kind
                    raise InvalidInput(f"malformed protobuf: {exc}") from None
                return (await answer(request, context)).SerializeToString()
            except FleetError as exc:
                await self._fail(context, exc)
            finally:
                self.in_flight -= 1

        return call

    # -- health and metadata ---------------------------------------------------
    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        await self.service.refresh_unready()
        return pb.ServerReadyResponse(ready=self.service.is_ready())

    async def model_ready(self, request, context):
        await self.service.refresh_unready()
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version or None))

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def model_metadata(self, request, context):
        doc = self.service.model_metadata(request.name, request.version or None)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def model_config(self, request, context):
        state = self.service._model(request.name)
        if request.version:
            self.service._version(state, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(state.config)
        if not response.config.name:
            response.config.name = state.spec.name
        return response

    async def model_statistics(self, request, context):
        doc = await self.service.model_stats(request.name or None, request.version or None)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def repository_index(self, request, context):
        await self.service.refresh_unready()
        entries = self.service.repository_index()
        if request.ready:
            entries = [e for e in entries if e["state"] == "READY"]
        return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse(), ignore_unknown_fields=True)

    async def repository_load(self, request, context):
        body = admin.RepositoryRequest(parameters=parameters_from_proto(request.parameters, "load"))
        await admin.load_model(self.service, request.model_name, body, _client(context))
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request, context):
        body = admin.RepositoryRequest(parameters=parameters_from_proto(request.parameters, "unload"))
        await admin.unload_model(self.service, request.model_name, body, _client(context))
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------
    async def _infer(self, msg: pb.ModelInferRequest, context, key: str | None, routing: str | None, trace=None):
        """(response message, fallback that answered or None) of one ModelInferRequest."""
        limits, deadline = self.limits, _deadline_us(context)
        return await self.service.answer(msg.model_name, msg.model_version or None,
                                         lambda: decode_infer_request(msg, limits, deadline),
                                         encode_infer_response, key, routing, trace)

    async def model_infer(self, data: bytes, context) -> bytes:
        self.in_flight += 1
        trailers: list[tuple[str, str]] = []
        trace = None
        try:
            headers = _headers(context)
            if self.tracing is not None:  # W3C traceparent in the metadata; this call's span's in the trailers
                trace = self.tracing.start_request(_metadata(headers, "traceparent"))
                if trace is not None:
                    trailers.append(("traceparent", trace.traceparent))
            key = self._access(Access.INFERENCE, context, headers)
            response, answered_by = await self._infer(parse_infer_request(data), context, key,
                                                      _metadata(headers, ROUTING_HEADER), trace)
            if answered_by is not None:
                trailers.append((FALLBACK_HEADER, answered_by))
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            return response  # serialized by encode_infer_response
        except FleetError as exc:
            if trace is not None:
                trace.finish(exc, model=None)
            await self._fail(context, exc, tuple(trailers))
        finally:
            self.in_flight -= 1

    async def _stream_one(self, data: bytes, context, routing: str | None, headers, client) -> list[bytes]:
        """The stream messages answering one request: its response (and an empty final one when the
        request asks for it with `triton_enable_empty_final_response`), or its error."""
        trace = self.tracing.start_request(None) if self.tracing is not None else None  # sampled as a new trace
        try:
            key = None if self._check is None else self._check(headers, client)
            msg = parse_infer_request(data)
            response, _ = await self._infer(msg, context, key, routing, trace)
        except FleetError as exc:
            return [pb.ModelStreamInferResponse(error_message=exc.message).SerializeToString()]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the stream
            return [pb.ModelStreamInferResponse(error_message=error_status(exc)[1]).SerializeToString()]
        asked = msg.parameters.get("triton_enable_empty_final_response")
        if asked is None or not asked.bool_param:
            return [stream_message(response)]
        response = response_message(response)
        response.parameters[FINAL_RESPONSE].bool_param = False
        final = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                      id=response.id)
        final.parameters[FINAL_RESPONSE].bool_param = True
        return [pb.ModelStreamInferResponse(infer_response=response).SerializeToString(),
                pb.ModelStreamInferResponse(infer_response=final).SerializeToString()]

    async def model_stream_infer(self, requests, context):
        """Requests of one stream run concurrently (at most MAX_STREAM_PIPELINE read ahead); their answers
        leave in the order the requests came. The guard checks every request (its rate limit counts each)."""
        headers, client = _headers(context), _client(context)
        routing = _metadata(headers, ROUTING_HEADER)
        pending: asyncio.Queue = asyncio.Queue(MAX_STREAM_PIPELINE)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for data in requests:
                    self.in_flight += 1
                    task = loop.create_task(self._stream_one(data, context, routing, headers, client))
                    task.add_done_callback(self._done)
                    await pending.put(task)
            finally:
                await pending.put(None)

        reader = loop.create_task(read())
        try:
            while True:
                task = await pending.get()
                if task is None:
                    break
                for message in await task:
                    await context.write(message)
            await reader  # a reading error (the client's stream broke) ends the call
        finally:
            reader.cancel()
            while not pending.empty():
                task = pending.get_nowait()
                if task is not None:
                    task.cancel()

    def _done(self, task) -> None:
        self.in_flight -= 1

    def unsupported(self, name: str) -> Callable:
        async def call(data: bytes, context) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: fleet does not support {_UNSUPPORTED[name]}")

        return call


def rpc_functions(service: InferenceService, guard: Guard | None = None) -> tuple[dict[str, Callable], Callable, _Handlers]:
    """Every RPC of the service for any transport: the unary ones by method name (`async (request bytes,
    context) -> response bytes`), ModelStreamInfer (`async (request bytes iterator, context)`, answers through
    `context.write`), and the object that counts calls in flight."""
    h = _Handlers(service, guard or Guard.from_options(service.options))
    O, I = Access.OPEN, Access.INFERENCE  # noqa: E741
    unary = {
        "ServerLive": h.unary(pb.ServerLiveRequest.FromString, O, h.server_live),
        "ServerReady": h.unary(pb.ServerReadyRequest.FromString, O, h.server_ready),
        "ModelReady": h.unary(pb.ModelReadyRequest.FromString, O, h.model_ready),
        "ServerMetadata": h.unary(pb.ServerMetadataRequest.FromString, O, h.server_metadata),
        "ModelMetadata": h.unary(pb.ModelMetadataRequest.FromString, I, h.model_metadata),
        "ModelConfig": h.unary(pb.ModelConfigRequest.FromString, I, h.model_config),
        "ModelStatistics": h.unary(pb.ModelStatisticsRequest.FromString, I, h.model_statistics),
        "RepositoryIndex": h.unary(pb.RepositoryIndexRequest.FromString, I, h.repository_index),
        "RepositoryModelLoad": h.unary(pb.RepositoryModelLoadRequest.FromString, Access.ADMIN, h.repository_load),
        "RepositoryModelUnload": h.unary(pb.RepositoryModelUnloadRequest.FromString, Access.ADMIN,
                                         h.repository_unload),
        "ModelInfer": h.model_infer,
        **{name: h.unsupported(name) for name in _UNSUPPORTED},
    }
    return unary, h.model_stream_infer, h


def build_handlers(service: InferenceService, guard: Guard | None = None) -> tuple[grpc.GenericRpcHandler, _Handlers]:
    """The service's generic handler for grpc.aio (every RPC) and the object that counts calls in flight."""
    unary, stream, h = rpc_functions(service, guard)
    methods = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in unary.items()}
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(stream)
    return grpc.method_handlers_generic_handler(SERVICE, methods), h
