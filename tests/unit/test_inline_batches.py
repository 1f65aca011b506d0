"""Where a TorchScript model's batches run: a cheap CPU model's batch of one request on the event loop (no hand-over
to its thread and back), every other batch on the model's thread (serving/backends/torchscript.py)."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from serving.backends.torchscript import _MEASURED
from serving.errors import RepositoryError
from serving.model_config import INLINE_PARAM, TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.registry import ModelRepository
from serving.service import InferenceService
from serving.workers import LocalWorkerClient, ModelRunner
from _scaled import model_bytes

MODEL = "m"
X = np.arange(4, dtype=np.float32).reshape(1, 4)


def _publish(repo: ModelRepository, *, work: int = 0, parameters: dict | None = None) -> None:
    cfg = make_config(MODEL, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=32,
                      parameters=parameters)
    repo.publish(MODEL, {"model.pt": model_bytes(3.0, work)}, {}, config=cfg, version=1)


def _body() -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": X.ravel().tolist()}]}).encode()


async def _served(repo: ModelRepository):
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    spec, cfg = repo.load_config(MODEL)
    service = InferenceService({MODEL: (spec, cfg, LocalWorkerClient(runner))}, ServingOptions(repository=repo.root_uri))
    await service.refresh()
    backend = runner.versions.backends[1]
    ran: list[tuple[bool, int]] = []  # (on the event loop's thread, rows) of each batch
    forward, loop_thread = backend._forward, threading.get_ident()

    def recording(inputs):
        ran.append((threading.get_ident() == loop_thread, len(inputs["x"])))
        return forward(inputs)

    backend._forward = recording
    return service, runner, backend, ran


async def _ask(service: InferenceService) -> float:
    answer = json.loads((await service.infer(MODEL, None, _body(), None))[0])
    return answer["outputs"][0]["data"][0]


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(str(tmp_path / "repo"))


async def test_a_cheap_models_lone_requests_run_on_the_loop_once_measured_and_a_crowd_on_its_thread(repo):
    _publish(repo, parameters={INLINE_PARAM: "5000"})  # (a loaded machine may stretch 500 µs: not the point here)
    service, runner, backend, ran = await _served(repo)
    try:
        for _ in range(10):  # one request at a time: each batch carries one
            assert await _ask(service) == 3.0 * (X[0, 0] + X[0, 2])
        assert 0 < backend.run_s <= backend.inline_max_s
        # the first batches are timed on the thread; from then on the loop runs them
        assert [on_loop for on_loop, _ in ran] == [False] * _MEASURED + [True] * (10 - _MEASURED)

        ran.clear()
        answers = await asyncio.gather(*(_ask(service) for _ in range(16)))  # 15 wait behind the first
        assert answers == [3.0 * (X[0, 0] + X[0, 2])] * 16
        assert ran == [(True, 1), (False, 15)]
    finally:
        await service.close()
        await runner.close()


async def test_a_slow_model_and_a_model_that_opts_out_run_every_batch_on_their_thread(repo, tmp_path):
    _publish(repo, work=30)  # 30 products of 256x256 matrices: well over the 500 µs a batch
    service, runner, backend, ran = await _served(repo)
    try:
        for _ in range(6):
            await _ask(service)
        assert backend.run_s > backend.inline_max_s
        assert ran == [(False, 1)] * 6
    finally:
        await service.close()
        await runner.close()

    other = ModelRepository(str(tmp_path / "other"))
    _publish(other, parameters={INLINE_PARAM: "0"})
    service, runner, backend, ran = await _served(other)
    try:
        for _ in range(6):
            await _ask(service)
        assert backend.inline_max_s == 0 and backend.run_s > 0
        assert ran == [(False, 1)] * 6
    finally:
        await service.close()
        await runner.close()


@pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
def test_an_inline_bound_that_is_not_a_number_of_microseconds_is_refused_naming_the_parameter(value):
    cfg = make_config(MODEL, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8,
                      parameters={INLINE_PARAM: value})
    with pytest.raises(RepositoryError, match=f"'{INLINE_PARAM}' must be a number of µs >= 0, got '{value}'"):
        spec_from_config(cfg)
