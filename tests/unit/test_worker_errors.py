"""Errors coming back from a worker through Ray keep their meaning for the client."""

from __future__ import annotations

from ray.exceptions import ActorDiedError, RayTaskError

from serving.errors import BackendError, ModelNotFound, ModelUnavailable
from serving.http_api import error_response
from serving.ingress import _unwrap


def test_a_fleet_error_raised_in_the_worker_reaches_the_client_as_itself():
    cause = ModelNotFound("model 'fraud' version 3 is not loaded on this worker")
    wrapped = RayTaskError("infer", "Traceback ...", cause).as_instanceof_cause()
    error = _unwrap(wrapped)
    assert error is cause
    response = error_response(error)
    assert response.status_code == 404
    assert b"version 3 is not loaded" in response.body


def test_a_dead_worker_is_a_503_the_client_may_retry():
    error = _unwrap(ActorDiedError())
    assert isinstance(error, ModelUnavailable)
    assert error_response(error).status_code == 503


def test_anything_else_passes_through_for_the_batcher_to_wrap():
    cause = RuntimeError("CUDA out of memory")
    assert _unwrap(cause) is cause
    assert error_response(BackendError("model 'fraud' failed: RuntimeError")).status_code == 500
