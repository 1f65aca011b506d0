"""The response cache on the test cluster: `fraud_cached` enables it (`response_cache { enable: true }`), the cluster
gives it 1 MiB per ingress replica. Repeated requests over HTTP and gRPC are answered from it, still counted in
the statistics, /metrics and the live feature histograms (the drift counts) and written to the prediction log
flagged `cache`; a new version is served at once,
never an old version's stored answer under its number.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow.dataset as ds
import pytest
import tritonclient.grpc as tgrpc

from benchmarks.live_cluster import metric_sum
from integration.test_preprocess_live import _settled
from integration.test_version_switch import _perturbed
from training.datasets import make_fraud

pytestmark = pytest.mark.integration

MODEL = "fraud_cached"


def _body(x: np.ndarray, request_id: str) -> dict:
    return {"id": request_id, "inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape),
                                          "data": x.ravel().tolist()}]}


def _cache_stats(base_url: str) -> tuple[int, int]:
    stats = httpx.get(f"{base_url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"]
    hits = sum(int(s["inference_stats"]["cache_hit"].get("count", 0)) for s in stats)
    return hits, sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def _logged(data_dir: Path, ids: set[str], timeout_s: float = 20.0) -> dict[str, str]:
    """{request id: answered_by} of `ids` once all are in the prediction log."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, str] = {}
    while time.monotonic() < deadline:
        folder = data_dir / "traffic" / MODEL
        if folder.is_dir():
            table = ds.dataset(folder, partitioning="hive").to_table(columns=["request_id", "answered_by"])
            found = {r: a for r, a in zip(table["request_id"].to_pylist(), table["answered_by"].to_pylist())
                     if r in ids}
            if len(found) == len(ids):
                return found
        time.sleep(0.5)
    raise AssertionError(f"{len(ids) - len(found)} of {len(ids)} requests are not in the prediction log")


def test_repeated_requests_are_answered_from_the_cache_counted_and_logged(base_url, grpc_address, fleet_cluster):
    run = uuid.uuid4().hex[:6]
    x, _ = make_fraud(1, seed=31)
    hits_before, success_before = _cache_stats(base_url)
    features_before = _settled(f"{base_url}/v2/models/{MODEL}/features")["rows"]
    with httpx.Client(timeout=10) as http:  # one connection: one replica, one cache
        answers = [http.post(f"{base_url}/v2/models/{MODEL}/infer", json=_body(x, f"http-{run}-{i}")).json()
                   for i in range(3)]
    assert all(a["outputs"] == answers[0]["outputs"] for a in answers) and answers[2]["id"] == f"http-{run}-2"
    client = tgrpc.InferenceServerClient(grpc_address)  # one channel: one replica
    try:
        features = tgrpc.InferInput("features", list(x.shape), "FP32")
        features.set_data_from_numpy(x)
        grpc_answers = [client.infer(MODEL, [features], request_id=f"grpc-{run}-{i}").as_numpy("probability")
                        for i in range(3)]
    finally:
        client.close()
    np.testing.assert_allclose(grpc_answers[2].ravel(), answers[0]["outputs"][0]["data"], rtol=1e-6)
    time.sleep(1.0)  # both replicas' counts pushed (every 0.5 s)
    hits, success = _cache_stats(base_url)
    assert hits - hits_before >= 4 and success - success_before == 6, (hits, success)
    metrics = httpx.get(f"{base_url}/metrics", timeout=10).text
    assert metric_sum(metrics, "fleet_cache_hits_total", model=MODEL) >= 4
    assert metric_sum(metrics, "fleet_cache_entries") >= 1 and metric_sum(metrics, "fleet_cache_bytes") > 0
    logged = _logged(Path(fleet_cluster[0].data_dir), {f"{p}-{run}-{i}" for p in ("http", "grpc") for i in range(3)})
    assert sum(a == "cache" for a in logged.values()) >= 4 and logged[f"http-{run}-0"] == "model", logged
    # The live feature histograms (what the drift windows count) see every answered row, hits included.
    assert _settled(f"{base_url}/v2/models/{MODEL}/features")["rows"] == features_before + 6


def test_a_new_version_never_answers_with_the_old_versions_cached_answer(base_url, repository_models):
    x, _ = make_fraud(1, seed=32)
    with httpx.Client(timeout=10) as http:
        first = http.post(f"{base_url}/v2/models/{MODEL}/infer", json=_body(x, "v1-a")).json()
        assert http.post(f"{base_url}/v2/models/{MODEL}/infer", json=_body(x, "v1-b")).json()["outputs"] == \
            first["outputs"]  # stored for version 1 on this replica
        v1 = int(first["model_version"])
        model_file = (Path(repository_models.root_uri) / MODEL / str(v1) / "model.pt").read_bytes()
        new_file, _ = _perturbed(model_file, seed=5)
        new = repository_models.publish(MODEL, {"model.pt": new_file}, repository_models.metadata(MODEL, v1))
        deadline, answer = time.monotonic() + 30, first
        while time.monotonic() < deadline and answer["model_version"] != str(new):
            answer = http.post(f"{base_url}/v2/models/{MODEL}/infer", json=_body(x, "v2")).json()
            assert answer["model_version"] in (str(v1), str(new)), answer
            if answer["model_version"] == str(v1):
                assert answer["outputs"] == first["outputs"]
            time.sleep(0.2)
        assert answer["model_version"] == str(new) and answer["outputs"] != first["outputs"], answer
        again = http.post(f"{base_url}/v2/models/{MODEL}/infer", json=_body(x, "v2-again")).json()
        assert again["outputs"] == answer["outputs"]
