"""HTTP routes: KServe v2 / Open Inference Protocol REST plus Triton's extensions.

Thin: each route reads the request, calls `InferenceService`, writes the answer.
Every error leaves through `error_response` with one shape, `{"error": "..."}`.
"""

from __future__ import annotations

import functools
import logging
import uuid
import zlib

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serving.errors import FleetError, InvalidInput, PayloadTooLarge
from serving.service import InferenceService, parse_header_length

__all__ = ["build_http_app", "error_response", "HEADER_LENGTH"]

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


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed if Content-Encoding says so; 413 over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("Content-Length must be a non-negative integer")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
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


def build_http_app(service: InferenceService) -> Starlette:
    """The ASGI app an ingress replica serves."""
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
    async def repository_index(request: Request) -> Response:
        return _json(service.repository_index())

    @_endpoint
    async def infer(request: Request) -> Response:
        p = request.path_params
        header_length = parse_header_length(request.headers.get(HEADER_LENGTH))
        body = await _read_body(request, limit)
        payload, json_length = await service.infer(p["model"], p.get("version"), body, header_length)
        if json_length is None:
            return Response(payload, media_type=_JSON)
        return Response(payload, media_type=_BINARY, headers={HEADER_LENGTH: str(json_length)})

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
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats, methods=["GET"]),
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
