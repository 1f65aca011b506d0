"""fleet's exceptions. The ingress maps them to HTTP in one place (`http_status`)."""

from __future__ import annotations

__all__ = [
    "FleetError",
    "InvalidInput",
    "ModelNotFound",
    "PayloadTooLarge",
    "Unauthorized",
    "Forbidden",
    "RateLimited",
    "Overloaded",
    "DeadlineExceeded",
    "ModelUnavailable",
    "BackendError",
    "RepositoryError",
]


class FleetError(Exception):
    """Base of every error fleet raises on purpose. `status` is the HTTP status."""

    status = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidInput(FleetError):
    """The request is malformed or does not match the model's inputs."""

    status = 400


class Unauthorized(FleetError):
    """Missing, malformed or unknown credentials (401, answered with `WWW-Authenticate: Bearer`)."""

    status = 401


class Forbidden(FleetError):
    """Valid credentials that may not call this endpoint, or an endpoint switched off (403)."""

    status = 403


class RateLimited(FleetError):
    """The client's key (or address) is over its request rate: retry after `retry_after_s` (429)."""

    status = 429


class ModelNotFound(FleetError):
    """No such model, or no such version of it being served."""

    status = 404


class PayloadTooLarge(FleetError):
    status = 413


class Overloaded(FleetError):
    """A queue is full: the client should retry later (503 with Retry-After)."""

    status = 503


class ModelUnavailable(FleetError):
    """The model exists but cannot answer now (loading, backend down, shutting down)."""

    status = 503


class DeadlineExceeded(FleetError):
    """The request's timeout ran out before it was computed."""

    status = 504


class BackendError(FleetError):
    """The model or its backend failed on a well-formed request."""

    status = 500


class RepositoryError(FleetError):
    """The model repository holds something fleet cannot use (bad config, missing file)."""

    status = 500
