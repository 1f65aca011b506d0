"""The response cache inside the service: what a hit skips, what it still counts, and what is never served from it
(HTTP and gRPC decoders over the same service; the cache itself: test_cache.py; a live cluster:
tests/integration/test_cache_live.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from serving.errors import BackendError
from serving.grpc.codec import decode_infer_request, encode_infer_response, response_message
from serving.limits import RequestLimits
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.service import InferenceService

LIMITS = RequestLimits(max_tensor_elements=0, max_string_bytes=0, max_json_depth=0, max_batch_rows=0)


class _Worker:
    """y = x * version; counts the rows it computed; fails while `fail` is set."""

    def __init__(self):
        self.versions = [1]
        self.rows = 0
        self.fail = False

    async def infer(self, version: int, inputs: dict) -> dict:
        if self.fail:
            raise BackendError("the backend failed")
        self.rows += len(inputs["x"])
        return {"y": inputs["x"] * version}

    async def status(self) -> dict:
        return {"versions": list(self.versions)}


async def _service(cache_bytes: int = 1 << 20, enabled: bool = True) -> tuple[InferenceService, _Worker]:
    cfg = make_config("m", [TensorSpec("x", "FP32", (2,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8)
    cfg.response_cache.enable = enabled
    worker = _Worker()
    service = InferenceService({"m": (spec_from_config(cfg), cfg, worker)},
                               ServingOptions(repository="/nonexistent", response_cache_bytes=cache_bytes))
    await service.refresh()
    return service, worker


def _http(rows, **extra) -> bytes:
    arr = np.asarray(rows, np.float32)
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(arr.shape),
                                   "data": arr.ravel().tolist()}], **extra}).encode()


async def _ask(service, body: bytes, version: str | None = None) -> dict:
    payload, _, _ = await service.infer("m", version, body, None)
    return json.loads(payload)


async def test_an_identical_request_is_answered_without_the_model_and_counted_as_a_success():
    service, worker = await _service()
    first = await _ask(service, _http([[1, 2]], id="a"))
    again = await _ask(service, _http([[1, 2]], id="b"))
    assert worker.rows == 1 and again["outputs"] == first["outputs"] and again["id"] == "b"
    await _ask(service, _http([[1, 2], [3, 4]]))  # other rows, other shape: computed
    assert worker.rows == 3
    stats = service.recorder.take()[("m", "1")]
    assert (stats.success, stats.cache_hits, stats.cache_misses) == (3, 1, 2)
    await service.close()


async def test_http_and_grpc_share_answers_and_the_transport_parameters_do_not_split_them():
    service, worker = await _service()
    await service.infer("m", None, _http([[5, 6]], parameters={"binary_data_output": True}), None)
    msg = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 2], contents=pb.InferTensorContents(fp32_contents=[5, 6]))])
    response, _ = await service.answer("m", None, lambda: decode_infer_request(msg, LIMITS, deadline_us=5_000_000),
                                       encode_infer_response)
    assert worker.rows == 1  # the gRPC request (its deadline a timeout parameter) hit the HTTP one's answer
    np.testing.assert_array_equal(np.frombuffer(response_message(response).raw_output_contents[0], "<f4"), [5, 6])
    await service.close()


async def test_errors_are_never_cached_and_a_version_switch_never_serves_the_old_answer():
    service, worker = await _service()
    worker.fail = True
    with pytest.raises(BackendError):
        await _ask(service, _http([[1, 1]]))
    worker.fail = False
    assert (await _ask(service, _http([[1, 1]])))["outputs"][0]["data"] == [1, 1]
    assert worker.rows == 1  # the failure was not kept: computed
    worker.versions = [2]
    await service.refresh()
    answer = await _ask(service, _http([[1, 1]]))
    assert answer["model_version"] == "2" and answer["outputs"][0]["data"] == [2, 2] and worker.rows == 2
    assert all(version == 2 for _, version, _, _ in service.cache._entries.values())  # version 1's were dropped
    await service.close()


@pytest.mark.parametrize("cache_bytes, enabled", [(0, True), (1 << 20, False)])
async def test_no_cache_without_both_the_servers_bytes_and_the_models_switch(cache_bytes, enabled):
    service, worker = await _service(cache_bytes, enabled)
    for _ in range(3):
        await _ask(service, _http([[1, 2]]))
    assert worker.rows == 3
    await service.close()


def test_a_hit_is_counted_in_the_drift_windows_as_its_batch_would_be():
    """A hit's rows reach the drift counts (features, score, PCA) and the live feature histograms exactly as the
    same rows answered by a batch do: the drift windows see the traffic the cache answers."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from serving.metrics import StatsRecorder
    from serving.monitoring.observe import DriftReference, VersionObserver
    from serving.preprocess import FeatureReference, Standardize

    rng = np.random.default_rng(3)
    edges = np.sort(rng.normal(size=(2, 9)), axis=1).astype(np.float32)
    monitoring = {"scores": {"output": "y", "edges": [[-1.0, 0.0, 1.0, 2.0]]},
                  "pca": {"edges": [[0.0, 0.5, 1.0, 4.0]], "mean": [0.1, -0.1], "components": [[0.6, 0.8]]}}
    x = rng.normal(size=(5, 2)).astype(np.float32)
    y = rng.normal(size=(5, 1)).astype(np.float32)

    def counted(answer) -> tuple[dict, np.ndarray]:
        recorder = StatsRecorder()
        pre = Standardize("x", np.array([0.2, -0.3], np.float32), np.array([1.5, 0.5], np.float32), 5.0,
                          FeatureReference(("a", "b"), edges))
        observer = VersionObserver("m", 1, DriftReference("x", ("a", "b"), edges, monitoring, "x"), recorder)
        answer(observer, pre)
        observer.flush_counts()
        return recorder.take_monitoring()["drift"][("m", "1")], recorder._features[("m", "1")]

    def batch(observer, pre) -> None:
        z, _ = pre.assemble([x])
        done = Future()
        done.set_result(None)
        observer([SimpleNamespace(future=done, inputs={"x": x}, rows=5, meta=None, flags=None)], {"x": z}, {"y": y},
                 0, 0)

    by_batch, features_by_batch = counted(batch)
    by_hit, features_by_hit = counted(lambda observer, pre: observer.count_cached({"x": x}, {"y": y}, pre))
    assert by_hit == by_batch and by_hit["rows"] == 5 and set(by_hit) == {"features", "score", "pca", "rows"}
    np.testing.assert_array_equal(features_by_hit, features_by_batch)
    assert features_by_hit.sum() == 10  # 5 rows x 2 features

    def hits(observer, pre) -> None:  # five hits of a row each: kept, then counted together
        for i in range(5):
            observer.count_cached({"x": x[i:i + 1]}, {"y": y[i:i + 1]}, pre)
        assert observer._cached and observer._pending_rows == 5  # nothing counted per hit

    by_hits, features_by_hits = counted(hits)
    assert by_hits == by_batch
    np.testing.assert_array_equal(features_by_hits, features_by_batch)
