"""fleet fronting a real Triton server: batches are forwarded with tritonclient, answers come back."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as tc

from training.preprocess_reference import standardize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def triton(fleet_cluster):
    _, triton = fleet_cluster
    if "error" in triton:
        raise triton["error"]
    return triton["proc"]


def test_forwarded_answers_equal_triton_and_fleet_own(host_port, triton, repository_models):
    x = np.random.default_rng(5).standard_normal((6, 30)).astype(np.float32)

    def infer(address: str, model: str) -> np.ndarray:
        client = tc.InferenceServerClient(address)
        inp = tc.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("probability")

    via_fleet = infer(host_port, "fraud_triton")
    local = infer(host_port, "fraud")
    # fleet standardizes the features (preprocess: standardize) before Triton sees them
    metadata = repository_models.metadata("fraud", 1)
    x = standardize(x, metadata, float(repository_models.spec("fraud").parameters["preprocess.clip"]))
    straight = infer(triton.http_url, "fraud")
    np.testing.assert_allclose(via_fleet, straight, rtol=1e-6)
    np.testing.assert_allclose(via_fleet, local, rtol=1e-5, atol=1e-7)
    meta = tc.InferenceServerClient(host_port).get_model_metadata("fraud_triton")
    assert meta["versions"] == ["1"]


def test_concurrent_requests_reach_triton_in_batches(base_url, triton):
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]}

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{base_url}/v2/models/fraud_triton/infer", json=body) for _ in range(64))
            )

    def read_counts() -> tuple[int, int]:
        stats = tc.InferenceServerClient(triton.http_url).get_inference_statistics("fraud")["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"]), int(stats.get("inference_count", 0))

    def triton_counts() -> tuple[int, int]:
        # Triton counts a request a moment after its answer is sent (the previous test's 6 rows sent straight to
        # it once showed up after this test's "before"): read until two reads 0.3 s apart agree.
        last, deadline = read_counts(), time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = read_counts()
            if now == last:
                break
            last = now
        return last

    requests_before, rows_before = triton_counts()
    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    requests_after, rows_after = triton_counts()
    # Triton received every row, in fewer requests than fleet's clients sent: fleet batched them.
    assert rows_after - rows_before == 64
    assert requests_after - requests_before < 64
