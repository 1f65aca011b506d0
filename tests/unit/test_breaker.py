"""The circuit breaker and the fallback: a failing backend stops getting batches, is probed back, and
its requests are answered by the fallback model, with the header that says so. No Ray, no sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker
from serving.errors import ModelUnavailable, RepositoryError
from serving.fallback import Fallback, breaker_config, check_fallbacks, fallback_of
from serving.http_api import error_response, infer_handler
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.service import InferenceService


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(failures: int = 3, cooldown_s: float = 1.0, max_cooldown_s: float = 4.0):
    clock = _Clock()
    return CircuitBreaker("m", BreakerConfig(failures, cooldown_s, max_cooldown_s), clock), clock


def test_it_opens_after_n_consecutive_failures_only():
    breaker, _ = _breaker()
    breaker.failure("refused")
    breaker.failure("refused")
    breaker.success()  # a success in between starts the count again
    breaker.failure("refused")
    breaker.failure("refused")
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure("connection refused")
    assert breaker.state == OPEN and breaker.opened == 1
    assert not breaker.allow() and not breaker.would_allow()
    assert breaker.retry_after_s == pytest.approx(1.0)
    assert "open after 3 failed batches (connection refused)" in breaker.describe()


def test_after_the_cool_down_one_probe_goes_and_its_success_closes_it():
    breaker, clock = _breaker()
    for _ in range(3):
        breaker.failure()
    clock.now += 0.99
    assert not breaker.allow()
    clock.now += 0.02
    assert breaker.would_allow()
    assert breaker.allow()  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow() and not breaker.would_allow()  # one probe at a time
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.retry_after_s == 0


def test_a_failed_probe_reopens_with_a_doubled_cool_down_up_to_the_cap():
    breaker, clock = _breaker(cooldown_s=1.0, max_cooldown_s=3.0)
    for _ in range(3):
        breaker.failure()
    waits = []
    for _ in range(4):
        waits.append(round(breaker.retry_after_s, 3))
        clock.now += breaker.retry_after_s
        assert breaker.allow()
        breaker.failure("still down")
        assert breaker.state == OPEN
    assert waits == [1.0, 2.0, 3.0, 3.0]
    clock.now += 3.0
    assert breaker.allow()
    breaker.success()  # back: the next opening starts from the first cool-down again
    for _ in range(3):
        breaker.failure()
    assert breaker.retry_after_s == pytest.approx(1.0)


def test_the_config_is_checked():
    with pytest.raises(ValueError):
        BreakerConfig(failures=0)
    with pytest.raises(ValueError):
        BreakerConfig(cooldown_s=2.0, max_cooldown_s=1.0)


# -- the fallback, through the service and the HTTP handler ---------------------------------------

_IN = [TensorSpec("x", "FP32", (2,))]
_OUT = [TensorSpec("y", "FP32", (2,))]


def _spec(name: str, inputs=_IN, outputs=_OUT, **params):
    return spec_from_config(make_config(name, inputs, outputs, max_batch_size=8, parameters=params), name=name)


def test_a_fallback_must_be_another_served_model_with_the_same_tensors():
    primary = _spec("remote", **{"fleet.fallback": "local:2", "fleet.breaker.failures": "2"})
    specs = {"remote": primary, "local": _spec("local")}
    assert fallback_of(primary, specs) == Fallback("local", 2)
    assert breaker_config(primary).failures == 2
    with pytest.raises(RepositoryError, match="'nowhere', which is not served"):
        check_fallbacks({"remote": _spec("remote", **{"fleet.fallback": "nowhere"})})
    other = _spec("local", outputs=[TensorSpec("y", "FP32", (3,))])
    with pytest.raises(RepositoryError, match="other outputs"):
        check_fallbacks({"remote": primary, "local": other})
    with pytest.raises(RepositoryError, match="the model itself"):
        check_fallbacks({"remote": _spec("remote", **{"fleet.fallback": "remote"})})
    with pytest.raises(RepositoryError, match="must be a positive number"):
        _spec("remote", **{"fleet.breaker.cooldown_ms": "soon"})


class _Worker:
    """A model's worker: `down` raises as a Triton backend that cannot reach its server does."""

    def __init__(self, scale: float, down: bool = False):
        self.scale = scale
        self.down = down
        self.batches = 0

    async def infer(self, version: int, inputs: dict) -> dict:
        self.batches += 1
        if self.down:
            raise ModelUnavailable("Triton at 127.0.0.1:1 is unreachable: connection refused")
        return {"y": inputs["x"] * self.scale}

    async def status(self) -> dict:
        return {"versions": [1]}


def _body(value: float) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [value, value]}]}).encode()


def _service(with_fallback: bool = True):
    params = {"fleet.backend": "triton", "fleet.triton.url": "127.0.0.1:1", "fleet.breaker.failures": "2",
              "fleet.breaker.cooldown_ms": "50", "fleet.breaker.max_cooldown_ms": "50"}
    if with_fallback:
        params["fleet.fallback"] = "local"
    remote, local = _Worker(10.0, down=True), _Worker(1.0)
    models = {}
    for name, spec, worker in (("remote", _spec("remote", **params), remote), ("local", _spec("local"), local)):
        models[name] = (spec, make_config(name, _IN, _OUT, max_batch_size=8), worker)
    return InferenceService(models, ServingOptions(repository="/nonexistent")), remote, local


def test_a_down_backend_is_answered_by_the_fallback_with_the_header_then_probed_back():
    async def run():
        service, remote, local = _service()
        await service.refresh()
        handle = infer_handler(service)
        answers = [await handle("remote", None, [], _body(float(i))) for i in range(6)]
        for i, (status, headers, body) in enumerate(answers):
            assert status == 200
            assert (b"fleet-fallback", b"local/1") in headers
            assert json.loads(body)["outputs"][0]["data"] == [float(i)] * 2  # the fallback's answer
        # The breaker opened after 2 failed batches: the dead backend saw no more.
        assert remote.batches == 2 and service.models["remote"].breaker.state == OPEN
        index = {e["name"]: e for e in service.repository_index()}
        assert index["remote"]["state"] == "READY" and "answered by local" in index["remote"]["reason"]
        remote.down = False
        await asyncio.sleep(0.06)  # the cool-down: the next request is the probe, and it succeeds
        status, headers, body = await handle("remote", None, [], _body(1.0))
        assert status == 200 and all(k != b"fleet-fallback" for k, _ in headers)
        assert json.loads(body)["outputs"][0]["data"] == [10.0, 10.0]
        assert service.models["remote"].breaker.state == CLOSED
        await service.close()

    asyncio.run(run())


def test_without_a_fallback_an_open_breaker_refuses_at_once_with_retry_after():
    async def run():
        service, remote, _ = _service(with_fallback=False)
        await service.refresh()
        for _ in range(2):
            with pytest.raises(ModelUnavailable):
                await service.infer("remote", None, _body(1.0), None)
        with pytest.raises(ModelUnavailable) as info:
            await service.infer("remote", None, _body(1.0), None)
        assert remote.batches == 2  # refused without touching the backend
        response = error_response(info.value)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        await service.close()

    asyncio.run(run())


def test_a_backend_reported_down_makes_the_model_not_ready_unless_it_has_a_fallback():
    class _Down(_Worker):
        async def status(self) -> dict:
            return {"versions": [1], "backend_error": "Triton at 127.0.0.1:1 has no ready model"}

    async def run(with_fallback: bool) -> bool:
        service, _, _ = _service(with_fallback)
        service.models["remote"].worker = _Down(1.0)
        await service.refresh()
        ready = service.model_ready("remote")
        await service.close()
        return ready

    assert asyncio.run(run(True)) is True
    assert asyncio.run(run(False)) is False


def test_a_readiness_probe_asks_again_about_a_model_that_is_not_ready():
    """A replica whose timer has not yet heard that the backend came up does not answer 503 for it:
    the probe asks the worker of a not-ready model once more (and only of a not-ready one)."""

    class _Flaky(_Worker):
        def __init__(self):
            super().__init__(1.0)
            self.backend_error: str | None = "Triton at 127.0.0.1:1 has no ready model"
            self.asked = 0

        async def status(self) -> dict:
            self.asked += 1
            return {"versions": [1], **({"backend_error": self.backend_error} if self.backend_error else {})}

    async def run():
        service, _, _ = _service(with_fallback=False)
        worker = service.models["remote"].worker = _Flaky()
        await service.refresh()
        assert not service.is_ready()
        worker.backend_error = None  # Triton came up; this replica's next timed refresh is seconds away
        assert not service.is_ready()
        await asyncio.gather(*(service.refresh_unready() for _ in range(5)))
        assert service.is_ready() and worker.asked == 2  # five concurrent probes, one question
        await service.refresh_unready()
        assert worker.asked == 2  # everything ready: nothing asked
        await service.close()

    asyncio.run(run())
