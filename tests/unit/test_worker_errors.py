"""Errors coming back from a worker through Ray keep their meaning for the client; a batch whose
replica died is sent once more."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from serving.errors import BackendError, DeadlineExceeded, ModelNotFound, ModelUnavailable
from serving.http_api import error_response
from serving.ingress import HandleWorkerClient, _unwrap, replica_gone, retry_budget_s


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


# -- the retry of a batch whose replica went away ------------------------------------------------
# A stand-in for a DeploymentHandle: the death of a replica cannot be caused without Ray, so each
# call answers what `outcomes` says next (an exception is raised, anything else returned).


class _Method:
    def __init__(self, outcomes: list):
        self.outcomes = outcomes
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            if callable(outcome):
                return await outcome()
            return outcome

        return answer()


class _Handle:
    def __init__(self, outcomes: list):
        self.infer = _Method(outcomes)
        self.status = _Method([])


def _run(client, deadline_ns: int = 0):
    return asyncio.run(client.infer(1, {"x": None}, deadline_ns))


def test_the_decision_retries_dead_or_unreachable_replicas_only():
    assert replica_gone(ActorDiedError())
    assert replica_gone(ActorUnavailableError("unavailable", None))
    assert replica_gone(RayActorError())
    assert replica_gone(ReplicaUnavailableError("replica-1"))
    # A task error is the model's unless what it wraps is a dead actor.
    assert replica_gone(RayTaskError("infer", "tb", ActorDiedError()))
    assert not replica_gone(RayTaskError("infer", "tb", ModelUnavailable("Triton is down")).as_instanceof_cause())
    assert not replica_gone(ModelUnavailable("the model failed to load"))
    assert not replica_gone(RuntimeError("CUDA out of memory"))


def test_the_retry_budget_is_the_deadline_capped_by_the_retry_timeout():
    assert retry_budget_s(0, 0, 10.0) == 10.0  # no deadline
    assert retry_budget_s(0, 2_000_000_000, 10.0) == 2.0
    assert retry_budget_s(0, 60_000_000_000, 10.0) == 10.0
    assert retry_budget_s(5_000_000_000, 4_000_000_000, 10.0) < 0  # already past it: no retry


def test_a_batch_whose_replica_died_is_answered_by_the_second_call():
    handle = _Handle([ActorDiedError(), {"y": 1}])
    client = HandleWorkerClient(handle)
    assert _run(client) == {"y": 1}
    assert handle.infer.calls == 2 and client.retries == 1


def test_it_is_retried_once_only():
    handle = _Handle([ActorDiedError(), ActorUnavailableError("unavailable", None), {"y": 1}])
    with pytest.raises(ModelUnavailable) as info:
        _run(HandleWorkerClient(handle))
    assert handle.infer.calls == 2
    assert error_response(info.value).status_code == 503


def test_an_error_the_model_raised_is_never_retried():
    cause = BackendError("model 'fraud' failed: shape mismatch")
    handle = _Handle([RayTaskError("infer", "tb", cause).as_instanceof_cause(), {"y": 1}])
    with pytest.raises(BackendError):
        _run(HandleWorkerClient(handle))
    assert handle.infer.calls == 1


def test_no_retry_past_the_deadline_and_the_retry_stops_at_it():
    handle = _Handle([ActorDiedError(), {"y": 1}])
    with pytest.raises(ModelUnavailable):
        _run(HandleWorkerClient(handle), deadline_ns=time.monotonic_ns() - 1)
    assert handle.infer.calls == 1

    async def slow():
        await asyncio.sleep(5)
        return {"y": 1}

    handle = _Handle([ActorDiedError(), slow])
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        _run(HandleWorkerClient(handle), deadline_ns=time.monotonic_ns() + 200_000_000)
    assert time.monotonic() - started < 1.0
