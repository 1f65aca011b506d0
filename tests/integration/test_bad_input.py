"""Bad input never crashes anything and never gets a 500: a 4xx saying what is wrong."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.integration

GOOD = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}


def _with(**changes) -> bytes:
    tensor = dict(GOOD["inputs"][0], **changes)
    return json.dumps({"inputs": [tensor]}).encode()


CASES = [
    # (what, path, body, headers, status, phrase in the error)
    ("wrong shape", "fraud", _with(shape=[1, 29], data=[0.0] * 29), {}, 400, "does not match the model's [-1, 30]"),
    ("data count off", "fraud", _with(data=[0.0] * 29), {}, 400, "needs 30 elements"),
    ("wrong datatype", "fraud", _with(datatype="FP64"), {}, 400, "datatype FP64 does not match the model's FP32"),
    ("unknown datatype", "fraud", _with(datatype="FLOAT"), {}, 400, "unsupported datatype"),
    ("text in numbers", "fraud", _with(data=["a"] * 30), {}, 400, "must be numbers"),
    ("missing input", "fraud", _with(name="other"), {}, 400, "has no input 'other'"),
    ("no inputs", "fraud", b'{"inputs": []}', {}, 400, "non-empty list"),
    ("malformed JSON", "fraud", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("empty body", "fraud", b"", {}, 400, "empty request body"),
    ("batch over max", "fraud", _with(shape=[257, 30], data=[0.0] * 257 * 30), {}, 400, "outside 1..256"),
    ("unknown model", "nope", json.dumps(GOOD).encode(), {}, 404, "unknown model 'nope'"),
    ("model name with path", "..%2Fetc", json.dumps(GOOD).encode(), {}, 404, ""),
    ("unknown version", "fraud/versions/7", json.dumps(GOOD).encode(), {}, 404, "no version 7"),
    ("bad version", "fraud/versions/x1", json.dumps(GOOD).encode(), {}, 404, "positive integer"),
    ("unknown output", "fraud",
     json.dumps({**GOOD, "outputs": [{"name": "nope"}]}).encode(), {}, 400, "has no output 'nope'"),
    ("header length past body", "fraud", json.dumps(GOOD).encode(),
     {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
    ("header length not a number", "fraud", json.dumps(GOOD).encode(),
     {"Inference-Header-Content-Length": "ten"}, 400, "non-negative integer"),
    ("bad gzip", "fraud", b"not gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("oversized body", "fraud", b"x" * (2 << 20), {}, 413, "over the limit"),
]


@pytest.mark.parametrize("what,model,body,headers,status,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx(base_url, what, model, body, headers, status, phrase):
    r = httpx.post(f"{base_url}/v2/models/{model}/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error"}
    assert phrase in doc["error"]


def _binary_request(sizes: list[int], payload: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                      "parameters": {"binary_data_size": s}} for s in sizes[:1]]}).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize("size,payload,phrase", [
    (120, b"\0" * 100, "runs past the end"),
    (100, b"\0" * 100, "needs 120"),
    (120, b"\0" * 130, "add up to 120"),
])
def test_binary_sizes_that_do_not_add_up(base_url, size, payload, phrase):
    body, headers = _binary_request([size], payload)
    r = httpx.post(f"{base_url}/v2/models/fraud/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert phrase in r.json()["error"]


def test_unknown_route_and_method(base_url):
    r = httpx.get(f"{base_url}/v2/nothing/here")
    assert r.status_code == 404 and "no endpoint" in r.json()["error"]
    r = httpx.get(f"{base_url}/v2/models/fraud/infer")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    r = httpx.get(f"{base_url}/v2/models/nope")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_cluster_still_healthy_after_bad_input(base_url):
    for _ in range(20):
        httpx.post(f"{base_url}/v2/models/fraud/infer", content=b"\xff\x00garbage")
    assert httpx.get(f"{base_url}/v2/health/ready").status_code == 200
    assert httpx.post(f"{base_url}/v2/models/fraud/infer", content=json.dumps(GOOD)).status_code == 200
