"""Model placement in the running cluster: colocated in the ingress replicas, or split into a worker deployment."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cluster.status import describe_cluster

pytestmark = pytest.mark.integration


def _infer(base_url: str, model: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_colocated_and_split_models_serve_the_same_file_with_the_same_answers(base_url, fleet_cluster):
    settings = fleet_cluster[0]
    info = describe_cluster({"url": base_url, "dashboard_url": settings.dashboard_url,
                             "repository": settings.repository})
    placement = {m["name"]: (m["placement"], m["replicas"]) for m in info["models"]}
    # The cluster default (auto, no GPU) colocates; fraud_slowq's config asks for its own deployment.
    assert placement["fraud"] == ("colocated", 0)
    assert placement["fraud_slowq"] == ("split", 1)
    assert info["ingress_replicas"] == settings.ingress_replicas

    x = np.random.default_rng(5).standard_normal((7, 30)).astype(np.float32)
    colocated = _infer(base_url, "fraud", x)
    split = _infer(base_url, "fraud_slowq", x)
    assert colocated.shape == (7, 1)
    np.testing.assert_allclose(colocated, split, rtol=0, atol=1e-6)
