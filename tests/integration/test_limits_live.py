"""Request limits in the running cluster: each is a 413/400 whose message names the limit and its setting.

The package cluster (conftest.py) runs with max_request_bytes=1 MiB, max_batch_rows=200 (below
fraud's max_batch_size of 256), max_string_bytes=64 KiB and the defaults max_json_depth=32,
max_tensor_elements=2**26. After every refusal the same cluster answers a good request.
"""

from __future__ import annotations

import gzip
import json
import struct

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

FEATURES = {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}


def _doc(**changes) -> dict:
    return {"inputs": [dict(FEATURES, **changes)]}


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _binary(inputs: list[dict], blob: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def _bytes_element(size: int) -> bytes:
    return struct.pack("<I", size) + b"b" * size


_BIG_SHAPE = [2_300_000, 30]  # 69,000,000 elements: over 2**26
CASES = [
    # (what, body, headers, status, phrases)
    ("body over max_request_bytes", b"{" + b" " * (1 << 20), {}, 413,
     ["over the limit of 1048576 bytes", "max_request_bytes", "FLEET_MAX_REQUEST_BYTES"]),
    ("gzip body inflating past max_request_bytes", gzip.compress(b" " * (4 << 20)), {"Content-Encoding": "gzip"}, 413,
     ["decompressed request body is over the limit of 1048576 bytes", "max_request_bytes"]),
    ("declared shape over max_tensor_elements", json.dumps(_doc(shape=_BIG_SHAPE, data=[0.0])).encode(), {}, 400,
     ["69000000 elements", "over the limit of 67108864 elements", "max_tensor_elements",
      "FLEET_MAX_TENSOR_ELEMENTS"]),
    ("binary shape over max_tensor_elements",
     *_binary([{"name": "features", "shape": _BIG_SHAPE, "datatype": "FP32",
                "parameters": {"binary_data_size": 120}}], b"\0" * 120), 400,
     ["69000000 elements", "max_tensor_elements"]),
    ("batch over max_batch_rows", json.dumps(_doc(shape=[201, 30], data=[0.0] * 201 * 30)).encode(), {}, 400,
     ["a batch of 201 rows is over the limit of 200 rows", "max_batch_rows", "FLEET_MAX_BATCH_ROWS"]),
    ("id over max_string_bytes", json.dumps({**_doc(), "id": "i" * 70_000}).encode(), {}, 400,
     ["'id' of 70000 bytes is over the limit of 65536 bytes", "max_string_bytes", "FLEET_MAX_STRING_BYTES"]),
    ("JSON BYTES element over max_string_bytes",
     json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["ok", "s" * 70_000]}]}).encode(),
     {}, 400, ["a BYTES element of 70000 bytes", "max_string_bytes"]),
    ("binary BYTES element over max_string_bytes",
     *_binary([{"name": "text", "shape": [2], "datatype": "BYTES",
                "parameters": {"binary_data_size": 4 + 2 + 4 + 70_000}}], _bytes_element(2) + _bytes_element(70_000)),
     400,
     ["BYTES element 1 of 70000 bytes", "max_string_bytes"]),
    ("parameter value over max_string_bytes", json.dumps({**_doc(), "parameters": {"note": "p" * 70_000}}).encode(),
     {}, 400, ["request parameter['note'] of 70000 bytes", "max_string_bytes"]),
    ("input name over max_string_bytes", json.dumps(_doc(name="n" * 70_000)).encode(), {}, 400,
     ["inputs[0] name of 70000 bytes", "max_string_bytes"]),
    ("parameters nested past max_json_depth", json.dumps({**_doc(), "parameters": {"p": _nested(31)}}).encode(), {},
     400, ["nesting depth of 33 is over the limit of 32", "max_json_depth", "FLEET_MAX_JSON_DEPTH"]),
    ("100,000 nested brackets", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400,
     ["nesting depth of 100001 is over the limit of 32", "max_json_depth"]),
    ("data nested past max_json_depth",
     json.dumps(_doc(shape=[1], data=_nested(40))).encode(), {}, 400, ["nesting depth of 43", "max_json_depth"]),
]


@pytest.mark.parametrize("what,body,headers,status,phrases", CASES, ids=[c[0] for c in CASES])
def test_each_limit_is_refused_with_its_setting_named(base_url, what, body, headers, status, phrases):
    r = httpx.post(f"{base_url}/v2/models/fraud/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error"}
    for phrase in phrases:
        assert phrase in doc["error"], doc["error"]


def test_at_the_limits_requests_are_answered(base_url):
    x = np.random.default_rng(8).standard_normal((200, 30)).astype(np.float32)
    doc = {"id": "i" * 65_536, "parameters": {"p": _nested(30)},  # depth 32: the root, "parameters", 30 lists
           "inputs": [{"name": "features", "shape": [200, 30], "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(f"{base_url}/v2/models/fraud/infer", json=doc, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"] == doc["id"] and answer["outputs"][0]["shape"] == [200, 1]
    assert all(0.0 <= p <= 1.0 for p in answer["outputs"][0]["data"])
    assert httpx.get(f"{base_url}/v2/health/ready").status_code == 200
