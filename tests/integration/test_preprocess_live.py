"""Preprocessing on the request path, against the real cluster: digits images of any size, fraud's
standardization (NaN rows refused, the rest answered) and the live feature histograms it counts."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as tc

from serving.registry import ModelRepository
from training.preprocess_reference import image_batch

pytestmark = pytest.mark.integration


def _digits_reference(repository, images: list[np.ndarray]) -> np.ndarray:
    repo = ModelRepository(str(repository))
    params = repo.spec("digits").parameters
    size = tuple(int(v) for v in params["preprocess.size"].split(","))
    x = image_batch(images, size, float(params["preprocess.mean"]), float(params["preprocess.std"]))
    module = torch.jit.load(str(repository / "digits" / "1" / "model.pt"))
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def _image_body(image: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, *image.shape], "datatype": "UINT8",
                        "data": image.ravel().tolist()}]}


def test_digits_images_of_any_size_batch_together_and_match_the_model(base_url, repository):
    rng = np.random.default_rng(3)
    sizes = [(8, 8), (28, 28), (50, 37), (3, 90), (16, 16), (9, 12)] * 8
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    before = httpx.get(f"{base_url}/v2/models/digits/stats").json()["model_stats"][0]

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            answers = await asyncio.gather(*(client.post("/v2/models/digits/infer", json=_image_body(img))
                                             for img in images))
        return answers

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * len(images), answers[0].text
    got = np.array([a.json()["outputs"][0]["data"] for a in answers], np.float32)
    np.testing.assert_allclose(got, _digits_reference(repository, images), atol=1e-5)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the replicas push their counts about once a second
        after = httpx.get(f"{base_url}/v2/models/digits/stats").json()["model_stats"][0]
        if after["inference_count"] - before["inference_count"] >= len(images):
            break
        time.sleep(0.3)
    executions = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == len(images)
    assert executions < len(images)  # sizes were mixed inside batches


def test_digits_takes_a_binary_batch_of_equal_sized_images(host_port, repository):
    images = np.random.default_rng(4).integers(0, 256, (5, 20, 20), dtype=np.uint8)
    inp = tc.InferInput("image", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=True)
    got = tc.InferenceServerClient(host_port).infer("digits", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(got, _digits_reference(repository, list(images)), atol=1e-5)


@pytest.mark.parametrize("body, phrase", [
    ({"inputs": [{"name": "image", "shape": [1, 0, 5], "datatype": "UINT8", "data": []}]}, "each side"),
    ({"inputs": [{"name": "image", "shape": [1, 2, 2], "datatype": "FP32", "data": [0, 0, 0, 0]}]}, "UINT8"),
    ({"inputs": [{"name": "image", "shape": [1, 2, 2], "datatype": "UINT8", "data": [0, 0, 0, 300]}]}, "255"),
    ({"inputs": [{"name": "image", "shape": [4], "datatype": "UINT8", "data": [0, 0, 0, 0]}]}, "shape"),
])
def test_bad_images_are_a_400_saying_what_is_wrong(base_url, body, phrase):
    answer = httpx.post(f"{base_url}/v2/models/digits/infer", json=body)
    assert answer.status_code == 400 and phrase in answer.json()["error"], answer.text


def test_a_fraud_row_holding_nan_is_refused_and_its_neighbours_answered(host_port, base_url):
    rng = np.random.default_rng(5)
    good = rng.standard_normal((1, 30)).astype(np.float32)
    bad = good.copy()
    bad[0, 4] = np.nan

    def infer_binary(x: np.ndarray) -> httpx.Response:
        inp = tc.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        body, header_length = tc.InferenceServerClient.generate_request_body([inp])
        return httpx.post(f"{base_url}/v2/models/fraud/infer", content=body,
                          headers={"Inference-Header-Content-Length": str(header_length),
                                   "Content-Type": "application/octet-stream"})

    async def run():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(None, infer_binary, x) for x in [good, bad] * 8))

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200, 400] * 8
    assert "NaN or infinity" in answers[1].json()["error"]


def _settled(url: str) -> dict:
    last = httpx.get(url).json()
    for _ in range(20):
        time.sleep(1.2)  # longer than a push interval
        now = httpx.get(url).json()
        if now["rows"] == last["rows"]:
            return now
        last = now
    return last


def test_fraud_counts_live_feature_histograms_against_its_reference_bins(base_url, repository):
    repo = ModelRepository(str(repository))
    reference = repo.metadata("fraud", 1)["reference_stats"]
    before = _settled(f"{base_url}/v2/models/fraud/features")  # earlier tests' counts have all arrived
    rows = np.random.default_rng(6).standard_normal((40, 30)).astype(np.float32)
    body = {"inputs": [{"name": "features", "shape": [40, 30], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    assert httpx.post(f"{base_url}/v2/models/fraud/infer", json=body).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = httpx.get(f"{base_url}/v2/models/fraud/features").json()
        if after["rows"] >= before["rows"] + 40:
            break
        time.sleep(0.3)
    assert after["rows"] == before["rows"] + 40
    first = after["features"][0]
    name = first["name"]
    assert first["edges"] == pytest.approx(reference[name]["edges"], rel=1e-6)
    grew = np.array(first["counts"]) - np.array(before["features"][0]["counts"])
    edges = np.array(first["edges"])
    col = rows[:, 0]
    expected = np.concatenate([[np.sum(col < edges[0])], np.histogram(col, bins=edges)[0], [np.sum(col > edges[-1])]])
    np.testing.assert_array_equal(grew, expected)
    answer = httpx.get(f"{base_url}/v2/models/digits/features")
    assert answer.status_code == 400 and "no feature statistics" in answer.json()["error"]
