"""The KServe v2 REST API as clients see it: plain HTTP and tritonclient, against a real cluster."""

from __future__ import annotations

import gzip
import os

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as tc

pytestmark = pytest.mark.integration


def _direct(repository, model: str, version: int, x: np.ndarray) -> np.ndarray:
    """What the TorchScript file computes when run in this process (after the standardization fleet applies)."""
    from serving.registry import ModelRepository
    from training.preprocess_reference import standardize

    repo = ModelRepository(str(repository))
    params = repo.spec(model).parameters
    if params.get("preprocess") == "standardize":
        x = standardize(x, repo.metadata(model, version), float(params["preprocess.clip"]))
    module = torch.jit.load(str(repository / model / str(version) / "model.pt"))
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def _features(n: int, seed: int = 0) -> np.ndarray:
    from training.datasets import make_fraud

    x, _ = make_fraud(n, seed=seed)
    return x


def test_server_metadata_and_health(base_url):
    meta = httpx.get(f"{base_url}/v2").json()
    assert meta["name"] == "fleet"
    # `make test` runs the request path twice: compiled kernels, then FLEET_PURE_PYTHON=1 in every replica too
    assert meta["native_kernels"] == ("numpy" if os.environ.get("FLEET_PURE_PYTHON") == "1" else "native")
    assert "binary_tensor_data" in meta["extensions"]
    assert httpx.get(f"{base_url}/v2/health/live").status_code == 200
    assert httpx.get(f"{base_url}/v2/health/ready").status_code == 200


def test_tritonclient_binary_infer_matches_the_model(host_port, repository):
    client = tc.InferenceServerClient(host_port)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fraud")
    meta = client.get_model_metadata("fraud")
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    assert meta["versions"] == ["1"]
    x = _features(5)
    inp = tc.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("fraud", [inp], outputs=[tc.InferRequestedOutput("probability", binary_data=True)],
                          request_id="abc")
    got = result.as_numpy("probability")
    assert got.dtype == np.float32 and got.shape == (5, 1)
    np.testing.assert_allclose(got, _direct(repository, "fraud", 1, x), rtol=1e-6, atol=1e-7)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "abc"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 20


def test_tritonclient_json_infer_matches_binary(host_port):
    client = tc.InferenceServerClient(host_port)
    x = _features(3, seed=7)
    answers = []
    for binary in (False, True):
        inp = tc.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = tc.InferRequestedOutput("probability", binary_data=binary)
        answers.append(client.infer("fraud", [inp], outputs=[out]).as_numpy("probability"))
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-6)


def test_plain_json_request_and_version_url(base_url, repository):
    x = _features(2, seed=3)
    body = {"id": "r1", "inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32",
                                    "data": x.tolist()}]}
    for path in ("/v2/models/fraud/infer", "/v2/models/fraud/versions/1/infer"):
        r = httpx.post(base_url + path, json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_name"] == "fraud" and doc["model_version"] == "1" and doc["id"] == "r1"
        out = doc["outputs"][0]
        assert out["name"] == "probability" and out["shape"] == [2, 1] and out["datatype"] == "FP32"
        np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 1),
                                   _direct(repository, "fraud", 1, x), rtol=1e-6, atol=1e-7)


def test_gzip_request_body_is_accepted(base_url):
    import orjson

    body = orjson.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]})
    r = httpx.post(f"{base_url}/v2/models/fraud/infer", content=gzip.compress(body),
                   headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 1]


def test_model_laid_out_for_triton_libtorch_loads_as_is(host_port, repository):
    client = tc.InferenceServerClient(host_port)
    meta = client.get_model_metadata("libtorch")
    assert meta["platform"] == "pytorch_libtorch"
    assert [t["name"] for t in meta["inputs"]] == ["input__0"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    inp = tc.InferInput("input__0", [3, 4], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("libtorch", [inp]).as_numpy("output__0")
    np.testing.assert_allclose(got, _direct(repository, "libtorch", 1, x), rtol=1e-5, atol=1e-6)


def test_model_config_stats_and_repository_index(base_url, host_port):
    config = httpx.get(f"{base_url}/v2/models/fraud/config").json()
    assert config["name"] == "fraud" and config["max_batch_size"] == 256
    assert config["input"][0]["name"] == "features" and config["input"][0]["data_type"] == "TYPE_FP32"
    client = tc.InferenceServerClient(host_port)
    assert client.get_model_config("fraud")["max_batch_size"] == 256
    index = client.get_model_repository_index()
    names = {e["name"] for e in index}
    assert {"fraud", "fraud_slowq", "libtorch", "slow", "fraud_triton"} <= names
    assert all(e["state"] == "READY" for e in index)
    stats = client.get_inference_statistics("fraud")["model_stats"]
    assert stats and stats[0]["name"] == "fraud" and stats[0]["version"] == "1"
    assert {"success", "fail", "queue", "compute_infer"} <= set(stats[0]["inference_stats"])


def test_model_and_version_readiness(base_url):
    assert httpx.get(f"{base_url}/v2/models/fraud/ready").status_code == 200
    assert httpx.get(f"{base_url}/v2/models/fraud/versions/1/ready").status_code == 200
    assert httpx.get(f"{base_url}/v2/models/fraud/versions/9/ready").status_code == 503
    r = httpx.get(f"{base_url}/v2/models/fraud/versions/1")
    assert r.status_code == 200 and r.json()["versions"] == ["1"]
