"""HTTP routes: KServe v2 / Open Inference Protocol REST plus Triton's extensions.

Thin: each route reads the request, calls `InferenceService`, writes the answer.
Every error leaves through `error_response` with one shape, `{"error": "..."}`.
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

from serving.errors import FleetError, InvalidInput, PayloadTooLarge
from serving.http_server import Handler, HttpRequest, HttpResponse
from serving.service import InferenceService, parse_header_length

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
        return _json({"error": exc.message}, exc.status, headers)
    if isinstance(exc, HTTPException):
        return _json({"error": exc.detail}, exc.status_code)
    request_id = uuid.uuid4().hex
    _log.error("unexpected error (request id %s)", request_id, exc_info=exc)
    return _json({"error": f"internal error; request id {request_id}"}, 500)


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


def infer_handler(service: InferenceService):
    """`POST /v2/models/{m}[/versions/{v}]/infer` straight to the service: no routing or middleware layers.

    The hot path. Returns `(status, headers, body)`; every error leaves through `error_response`.
    """
    limit = service.options.max_request_bytes
    json_type = (b"content-type", _JSON.encode())
    binary_type = (b"content-type", _BINARY.encode())
    length_key = HEADER_LENGTH.encode()

    async def handle(model: str, version: str | None, headers, body: bytes) -> HttpResponse:
        try:
            encoding = header_length = None
            for key, value in headers:
                if key == b"inference-header-content-length":
                    header_length = value.decode("latin-1")
                elif key == b"content-encoding":
                    encoding = value.decode("latin-1")
            if encoding is not None:
                body = decode_body(body, encoding, limit)
            payload, json_length = await service.infer(model, version, body, parse_header_length(header_length))
        except Exception as exc:  # noqa: BLE001 - every error leaves through error_response
            return _answer(error_response(exc))
        if json_length is None:
            return 200, [json_type], payload
        return 200, [binary_type, (length_key, str(json_length).encode())], payload

    return handle


def build_handler(service: InferenceService) -> Handler:
    """What fleet's own HTTP server (`serving.http_server`) calls per request."""
    routes = build_starlette_app(service)
    infer = infer_handler(service)

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            match = _INFER_PATH.fullmatch(request.path)
            if match is not None:
                return await infer(match.group(1), match.group(2), request.headers, request.body)
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
    routes = build_starlette_app(service)
    infer = infer_handler(service)
    limit = service.options.max_request_bytes

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                headers = scope["headers"]
                declared = next((v.decode("latin-1") for k, v in headers if k == b"content-length"), None)
                try:
                    body = await read_body(declared, None, _Chunks(receive), limit)
                except ClientDisconnect:
                    return
                except Exception as exc:  # noqa: BLE001
                    await error_response(exc)(scope, receive, send)
                    return
                status, out_headers, payload = await infer(match.group(1), match.group(2), headers, body)
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
        if not declared.isdigit():
            raise InvalidInput("Content-Length must be a non-negative integer")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
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
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return out


def build_starlette_app(service: InferenceService) -> Starlette:
    """Every route, through Starlette (infer too, through the same `infer_handler` as the front ends)."""
    limit = service.options.max_request_bytes

    @_endpoint
    async def server_metadata(request: Request) -> Response:
        return _json(service.server_metadata())

    @_endpoint
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    @_endpoint
    async def ready(request: Request) -> Response:
        return Response(status_code=200 if service.is_ready() else 503)

    @_endpoint
    async def model_metadata(request: Request) -> Response:
        p = request.path_params
        return _json(service.model_metadata(p["model"], p.get("version")))

    @_endpoint
    async def model_ready(request: Request) -> Response:
        p = request.path_params
        return Response(status_code=200 if service.model_ready(p["model"], p.get("version")) else 503)

    @_endpoint
    async def model_config(request: Request) -> Response:
        return _json(service.model_config(request.path_params["model"]))

    @_endpoint
    async def model_stats(request: Request) -> Response:
        p = request.path_params
        return _json(await service.model_stats(p.get("model"), p.get("version")))

    @_endpoint
    async def model_features(request: Request) -> Response:
        p = request.path_params
        return _json(await service.model_features(p["model"], p.get("version")))

    async def repository_index(request: Request) -> Response:
        return _json(service.repository_index())

    fast_infer = infer_handler(service)

    @_endpoint
    async def infer(request: Request) -> Response:
        # The front ends (build_handler, build_http_app) take POST infer before routing; the
        # route gives other methods their 405 and serves this app when it is mounted on its own.
        p = request.path_params
        body = await read_body(request.headers.get("content-length"), None, request.stream(), limit)
        status, headers, payload = await fast_infer(p["model"], p.get("version"), request.headers.raw, body)
        response = Response(payload, status_code=status)
        response.raw_headers += headers
        return response

    @_endpoint
    async def metrics(request: Request) -> Response:
        return Response(await service.metrics(), media_type=_PROMETHEUS)

    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/features", model_features, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/features", model_features, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            exc = HTTPException(404, f"no endpoint {request.method} {request.url.path}")
        elif exc.status_code == 405:
            exc = HTTPException(405, f"{request.method} is not allowed on {request.url.path}")
        return error_response(exc)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
