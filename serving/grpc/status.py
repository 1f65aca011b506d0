"""fleet's errors as gRPC statuses: the same message as the HTTP answer, the code its status maps to.

A 503 carries its retry hint as `grpc-retry-pushback-ms` trailing metadata (the key gRPC's own
retry policy reads) and `retry-after` (seconds, as HTTP's header); a 401 adds
`www-authenticate`. Anything that is not a FleetError is logged with an id and answered
INTERNAL with that id, never its text.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from serving.errors import FleetError

__all__ = ["grpc_code", "error_status"]

_log = logging.getLogger("fleet.grpc")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status (Google's mapping; other 4xx: INVALID_ARGUMENT, 5xx: INTERNAL)."""
    code = _CODES.get(http_status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) of an exception."""
    if isinstance(exc, FleetError):
        trailers: tuple[tuple[str, str], ...] = ()
        if exc.retry_after_s is not None:
            trailers = (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after_s * 1000)))),
                        ("retry-after", str(max(1, round(exc.retry_after_s)))))
        if exc.status == 401:
            trailers += (("www-authenticate", 'Bearer realm="fleet"'),)
        return grpc_code(exc.status), exc.message, trailers
    request_id = uuid.uuid4().hex
    _log.error("unexpected error in a gRPC call (request id %s)", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; request id {request_id}", ()
