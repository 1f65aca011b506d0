"""HTTP routes: KServe v2 / Open Inference Protocol REST plus Triton's extensions.

Thin: each route reads the request, calls `InferenceService`, writes the answer.
Every error leaves through `error_response` with one shape, `{"error": "..."}`.
Each route is open, under the inference rule or admin (serving/auth.py); one `Guard`
per front end checks it, the infer fast path included (nothing to check: no cost).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
import zlib

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serving import admin
from serving.rollout import api as rollout_api
from serving.rollout.controller import ACTIONS
from serving.auth import Access, Guard
from serving.errors import FleetError, InvalidInput, PayloadTooLarge
from serving.fallback import FALLBACK_HEADER
from serving.limits import over_limit
from serving.model_config import is_decimal
from serving.http_server import Handler, HttpRequest, HttpResponse
from serving.openapi import openapi_document
from serving.rollout.routing import ROUTING_HEADER
from serving.service import SERVER_VERSION, InferenceService, parse_header_length

__all__ = [
    "build_handler", "build_http_app", "build_starlette_app", "call_asgi", "infer_handler", "read_body",
    "decode_body", "error_response", "HEADER_LENGTH",
]

_log = logging.getLogger("fleet.http")

HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_BINARY = "application/octet-stream"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _json(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=_JSON, headers=headers)


def error_response(exc: BaseException) -> Response:
    """The one place exceptions become HTTP answers."""
    if isinstance(exc, FleetError):
        headers = None
        if exc.retry_after_s is not None:
            headers = {"retry-after": str(max(1, round(exc.retry_after_s)))}
        if exc.status == 401:
            headers = {**(headers or {}), "www-authenticate": 'Bearer realm="fleet"'}
        return _json({"error": exc.message}, exc.status, headers)
    if isinstance(exc, HTTPException):
        return _json({"error": exc.detail}, exc.status_code)
    request_id = uuid.uuid4().hex
    _log.error("unexpected error (request id %s)", request_id, exc_info=exc)
    return _json({"error": f"internal error; request id {request_id}"}, 500)


_UNGUARDED = Guard()  # a front end that checks a request itself hands the fast path this
_ADMIN_BODY_BYTES = 64 << 10
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class _Chunks:
    """The ASGI request body as an async iterator; a client that went away ends the request."""

    __slots__ = ("_receive", "_done")

    def __init__(self, receive):
        self._receive = receive
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        self._done = not message.get("more_body", False)
        return message.get("body", b"")


def _answer(response: Response) -> HttpResponse:
    return response.status_code, response.raw_headers, response.body


def infer_handler(service: InferenceService, guard: Guard | None = None):
    """`POST /v2/models/{m}[/versions/{v}]/infer` straight to the service: no routing or middleware layers.

    The hot path. Returns `(status, headers, body)`; every error leaves through `error_response`.
    `guard` (default: the service options'): the API key and rate limit, skipped when there is none.
    """
    limit = service.options.max_request_bytes
    guard = guard or Guard.from_options(service.options)
    check = None if guard.inference_free else guard.inference
    json_type = (b"content-type", _JSON.encode())
    binary_type = (b"content-type", _BINARY.encode())
    length_key = HEADER_LENGTH.encode()
    fallback_key = FALLBACK_HEADER.encode()
    routing_key = ROUTING_HEADER.encode()
    tracing = service.tracing

    async def handle(model: str, version: str | None, headers, body: bytes, client=None,
                     key: str | None = None) -> HttpResponse:
        # `key`: the caller's key id when the front end checked the request itself.
        trace = None
        try:
            encoding = header_length = routing = traceparent = None
            for name, value in headers:
                if name == b"inference-header-content-length":
                    header_length = value.decode("latin-1")
                elif name == b"content-encoding":
                    encoding = value.decode("latin-1")
                elif name == routing_key:
                    routing = value.decode("latin-1")
                elif name == b"traceparent":
                    traceparent = value
            if tracing is not None:  # W3C traceparent in, this request's span's out (serving/telemetry/tracing.py)
                trace = tracing.start_request(traceparent)
            if check is not None:
                key = check(headers, client)
            if encoding is not None:
                body = decode_body(body, encoding, limit)
            payload, json_length, answered_by = await service.infer(
                model, version, body, parse_header_length(header_length), key, routing, trace)
        except Exception as exc:  # noqa: BLE001 - every error leaves through error_response
            status, out, payload = _answer(error_response(exc))
            if trace is not None:
                trace.finish(exc, model=model)  # (a refusal before the service; later calls do nothing)
                out = [*out, (b"traceparent", trace.traceparent.encode())]
            return status, out, payload
        headers = [json_type] if json_length is None else [binary_type, (length_key, str(json_length).encode())]
        if answered_by is not None:  # the model's backend is down: its fallback answered (serving/fallback.py)
            headers.append((fallback_key, answered_by.encode()))
        if trace is not None:
            headers.append((b"traceparent", trace.traceparent.encode()))
        return 200, headers, payload

    return handle


def build_handler(service: InferenceService) -> Handler:
    """What fleet's own HTTP server (`serving.http_server`) calls per request."""
    guard = Guard.from_options(service.options)
    routes = build_starlette_app(service, guard)
    infer = infer_handler(service, guard)

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            match = _INFER_PATH.fullmatch(request.path)
            if match is not None:
                return await infer(match.group(1), match.group(2), request.headers, request.body, request.client)
        return await call_asgi(routes, request)

    return handler


async def call_asgi(app, request: HttpRequest) -> HttpResponse:
    """Run a whole (non-streaming) request through an ASGI app and collect its answer."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query, "root_path": "", "headers": request.headers,
        "client": request.client, "server": None,
    }
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # nothing more: the server cancels us if the client leaves
        return {"type": "http.disconnect"}

    answer = {"status": 500, "headers": [], "body": []}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer["body"].append(message.get("body", b""))

    await app(scope, receive, send)
    return answer["status"], answer["headers"], b"".join(answer["body"])


def build_http_app(service: InferenceService):
    """The ASGI app for Serve's HTTP ingress (http_server: serve): the infer routes on the lean path."""
    guard = Guard.from_options(service.options)
    routes = build_starlette_app(service, guard)
    infer = infer_handler(service, _UNGUARDED)  # checked here, before the body is read
    check = None if guard.inference_free else guard.inference
    limit = service.options.max_request_bytes

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                headers = scope["headers"]
                key = None
                if check is not None:
                    try:
                        key = check(headers, scope.get("client"))
                    except FleetError as exc:
                        await error_response(exc)(scope, receive, send)
                        return
                declared = next((v.decode("latin-1") for k, v in headers if k == b"content-length"), None)
                try:
                    body = await read_body(declared, None, _Chunks(receive), limit)
                except ClientDisconnect:
                    return
                except Exception as exc:  # noqa: BLE001
                    await error_response(exc)(scope, receive, send)
                    return
                status, out_headers, payload = await infer(match.group(1), match.group(2), headers, body, key=key)
                await send({"type": "http.response.start", "status": status,
                            "headers": out_headers + [(b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
        await routes(scope, receive, send)

    return app


def _endpoint(handler):
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - every error leaves through error_response
            return error_response(exc)

    return wrapped


async def read_body(declared: str | None, encoding: str | None, chunks, limit: int) -> bytes:
    """Collect `chunks` (an async iterator of bytes) into the body, enforcing `limit` before and after inflating."""
    if declared is not None:
        if not is_decimal(declared):
            raise InvalidInput("Content-Length must be a non-negative integer")
        if int(declared) > limit:
            raise PayloadTooLarge(over_limit(f"request body of {declared} bytes", limit, "max_request_bytes", " bytes"))
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(over_limit("request body", limit, "max_request_bytes", " bytes"))
        parts.append(chunk)
    return decode_body(parts[0] if len(parts) == 1 else b"".join(parts), encoding, limit)


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent, or inflated when Content-Encoding is gzip/deflate (413 past `limit`)."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(over_limit("decompressed request body", limit, "max_request_bytes", " bytes"))
    return out


def _requires(guard: Guard, access: Access):
    """An endpoint that answers only requests `guard` lets through for `access` (inside `_endpoint`)."""

    def wrap(handler):
        if access is Access.OPEN or (access is Access.INFERENCE and guard.inference_free):
            return handler

        @functools.wraps(handler)
        async def checked(request: Request) -> Response:
            try:
                guard.check(access, request.headers.raw, request.client)
            except FleetError as exc:
                if access is Access.ADMIN:
                    admin.audit_denied(request.method, request.url.path, exc.status, request.client)
                raise
            return await handler(request)

        return checked

    return wrap


def build_starlette_app(service: InferenceService, guard: Guard | None = None) -> Starlette:
    """Every route, through Starlette (infer too, through the same `infer_handler` as the front ends).

    `guard` (default: the service options'): who may call which route (serving/auth.py).
    """
    limit = service.options.max_request_bytes
    guard = guard or Guard.from_options(service.options)
    inference, admin_only = _requires(guard, Access.INFERENCE), _requires(guard, Access.ADMIN)

    @_endpoint
    async def server_metadata(request: Request) -> Response:
        return _json(service.server_metadata())

    # Health answers carry the Open Inference Protocol's bodies (inference_rest.md): the KServe SDK reads them,
    # tritonclient reads only the status, which says the same (503: not ready).
    @_endpoint
    async def live(request: Request) -> Response:
        return _json({"live": True})

    @_endpoint
    async def ready(request: Request) -> Response:
        await service.refresh_unready()
        ok = service.is_ready()
        return _json({"ready": ok}, 200 if ok else 503)

    @_endpoint
    async def healthz(request: Request) -> Response:
        # KubeRay's readiness probe of a serve pod: 200 with the body "success" when this replica is ready.
        await service.refresh_unready()
        if service.is_ready():
            return Response(b"success", status_code=200, media_type="text/plain")
        return _json({"error": "not ready: " + (service.unready_reason() or "a model is not ready")}, 503)

    @_endpoint
    @inference
    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        return _json(service.model_metadata(p["model"], p.get("version")))

    @_endpoint
    async def model_ready(request: Request) -> Response:
        p = request.path_params
        await service.refresh_unready()
        ok = service.model_ready(p["model"], p.get("version"))
        return _json({"name": p["model"], "ready": ok}, 200 if ok else 503)

    @_endpoint
    @inference
    async def model_config(request: Request) -> Response:
        return _json(service.model_config(request.path_params["model"]))

    @_endpoint
    @inference
    async def model_stats(request: Request) -> Response:
        p = request.path_params
        return _json(await service.model_stats(p.get("model"), p.get("version")))

    @_endpoint
    @inference
    async def model_features(request: Request) -> Response:
        p = request.path_params
        return _json(await service.model_features(p["model"], p.get("version")))

    @_endpoint
    @inference
    async def repository_index(request: Request) -> Response:
        await service.refresh_unready()
        return _json(service.repository_index())

    @_endpoint
    @inference
    async def model_feedback(request: Request) -> Response:
        body = await read_body(request.headers.get("content-length"), request.headers.get("content-encoding"),
                               request.stream(), limit)
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
        return _json(await service.feedback(request.path_params["model"], body, header_length))

    @_endpoint
    @inference
    async def model_drift(request: Request) -> Response:
        p = request.path_params
        return _json(await service.monitor_report("drift", p["model"], p.get("version")))

    @_endpoint
    @inference
    async def model_quality(request: Request) -> Response:
        p = request.path_params
        return _json(await service.monitor_report("quality", p["model"], p.get("version")))

    async def admin_body(request: Request) -> bytes:
        return await read_body(request.headers.get("content-length"), None, request.stream(), _ADMIN_BODY_BYTES)

    @_endpoint
    @admin_only
    async def repository_load(request: Request) -> Response:
        body = admin.parse_request(await admin_body(request), admin.RepositoryRequest)
        return _json(await admin.load_model(service, request.path_params["model"], body, request.client))

    @_endpoint
    @admin_only
    async def repository_unload(request: Request) -> Response:
        body = admin.parse_request(await admin_body(request), admin.RepositoryRequest)
        return _json(await admin.unload_model(service, request.path_params["model"], body, request.client))

    @_endpoint
    @admin_only
    async def model_versions(request: Request) -> Response:
        body = admin.parse_request(await admin_body(request), admin.VersionsRequest)
        return _json(await admin.pin_versions(service, request.path_params["model"], body, request.client))

    @_endpoint
    @admin_only
    async def model_rollout(request: Request) -> Response:
        return _json(await rollout_api.rollout_status(service, request.path_params["model"]))

    def model_rollout_action(action: str):
        @_endpoint
        @admin_only
        async def act(request: Request) -> Response:
            body = admin.parse_request(await admin_body(request), rollout_api.RolloutRequest)
            return _json(await rollout_api.rollout_action(service, request.path_params["model"], action, body,
                                                          request.client))

        return act

    fast_infer = infer_handler(service, guard)

    @_endpoint
    async def infer(request: Request) -> Response:
        # The front ends (build_handler, build_http_app) take POST infer before routing; the
        # route gives other methods their 405 and serves this app when it is mounted on its own.
        p = request.path_params
        body = await read_body(request.headers.get("content-length"), None, request.stream(), limit)
        status, headers, payload = await fast_infer(p["model"], p.get("version"), request.headers.raw, body,
                                                    request.client)
        response = Response(payload, status_code=status)
        response.raw_headers += headers
        return response

    @_endpoint
    @inference
    async def metrics(request: Request) -> Response:
        return Response(await service.metrics(), media_type=_PROMETHEUS)

    # serving/openapi.py: one entry per route
    openapi_body = orjson.dumps(openapi_document(SERVER_VERSION, api_keys=guard.keys_required))

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type=_JSON)

    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/", server_metadata, methods=["GET"]),  # the path as open_inference_rest.yaml writes it
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/-/healthz", healthz, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        Route("/v2/admin/models/{model}/versions", model_versions, methods=["POST"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/features", model_features, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/feedback", model_feedback, methods=["POST"]),
        Route("/v2/models/{model}/drift", model_drift, methods=["GET"]),
        Route("/v2/models/{model}/rollout", model_rollout, methods=["GET"]),
        *(Route(f"/v2/models/{{model}}/rollout/{action}", model_rollout_action(action), methods=["POST"])
          for action in ACTIONS),
        Route("/v2/models/{model}/quality", model_quality, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/drift", model_drift, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/quality", model_quality, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/features", model_features, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            exc = HTTPException(404, f"no endpoint {request.method} {request.url.path}")
        elif exc.status_code == 405:
            exc = HTTPException(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
