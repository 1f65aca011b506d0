"""Every v2 route fleet serves, answered as the Open Inference Protocol's own documents say.

A walk over the running cluster: server metadata, model metadata (with and without a version),
the health and readiness routes, inference (JSON, and the binary tensor extension) and the error
answers of each. Every answer is validated against the schema `open_inference_rest.yaml` gives
its route and status, and against the body `inference_rest.md` defines (tests/integration/_oip.py
reads both from tests/data/open-inference-protocol/). Fleet's extra fields (Triton's extensions,
its own) must not break either. Where fleet answers otherwise on purpose, the difference is named
here and in the README ("Where fleet differs from the specification").
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest
from jsonschema import Draft202012Validator
from tritonclient.utils import triton_to_np_dtype

from integration._oip import DATATYPES, PLATFORMS, prose_schemas, rest_validator

pytestmark = pytest.mark.integration

_PROSE = prose_schemas()
# Deliberate differences (README, "Where fleet differs from the specification"):
# - the prose's server ready object reads `"live" : $bool` (a copy of the live object above it): fleet
#   answers `ready`, the field the KServe SDK reads and the gRPC ServerReadyResponse has;
_SERVER_READY = {"type": "object", "properties": {"ready": {"type": "boolean"}}, "required": ["ready"]}
# - the prose lists no platform name for TorchScript run by libtorch under Triton's name: fleet's
#   model repository is Triton's, and its config.pbtxt says `pytorch_libtorch`, as Triton answers.
_TRITON_PLATFORMS = {"pytorch_libtorch"}
_ERROR = _PROSE["inference_error_response"]  # every error object of the prose is this one

# route (a path pattern) -> (the prose's body of its answer, of its error answer)
_ROUTES = (
    (r"/v2/?", "metadata_server_response", "metadata_server_error_response"),
    (r"/v2/health/live", "live_server_response", None),
    (r"/v2/health/ready", _SERVER_READY, None),
    (r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready", "ready_model_response", None),
    (r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer", "inference_response", "inference_error_response"),
    (r"/v2/models/[^/]+(?:/versions/[^/]+)?", "metadata_model_response", "metadata_model_error_response"),
)
_HEALTH = {r"/v2/health/ready", r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready"}  # 503 carries the ready body


def _prose_validator(method: str, path: str, status: int) -> Draft202012Validator:
    """The validator of the body inference_rest.md defines for this answer."""
    for pattern, ok, error in _ROUTES:
        if re.fullmatch(pattern, path):
            body = ok if status == 200 or (status == 503 and pattern in _HEALTH) else (error or _ERROR)
            schema = _PROSE[body] if isinstance(body, str) else body
            return Draft202012Validator(schema)
    raise LookupError(f"{method} {path}: no route of the protocol")


def _embed_binary(body: bytes, header_length: int) -> dict:
    """The binary extension's answer as the JSON answer it stands for: each binary output's data back in."""
    doc = orjson.loads(body[:header_length])
    offset = header_length
    for out in doc["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw = np.frombuffer(body[offset:offset + size], dtype=triton_to_np_dtype(out["datatype"]))
            out["data"] = raw.tolist()
            offset += size
    assert offset == len(body), "bytes after the last binary output"
    return doc


class _Walk:
    """Sends requests and checks each answer against both documents."""

    def __init__(self, base_url: str):
        self.client = httpx.Client(base_url=base_url, timeout=30)

    def __call__(self, method: str, path: str, *, expect: int, **kwargs) -> dict:
        r = self.client.request(method, path, **kwargs)
        assert r.status_code == expect, (method, path, r.status_code, r.text[:300])
        length = r.headers.get("inference-header-content-length")
        if length is not None:
            assert r.headers["content-type"] == "application/octet-stream", (method, path)
            body = _embed_binary(r.content, int(length))
        else:
            assert r.headers["content-type"] == "application/json", (method, path, r.headers.get("content-type"))
            body = r.json()
        prose = _prose_validator(method, path, r.status_code)
        problems = [f"inference_rest.md: {e.message} at {list(e.absolute_path)}" for e in prose.iter_errors(body)]
        validator = rest_validator(method, path, r.status_code)
        if validator is not None:
            problems += [f"open_inference_rest.yaml: {e.message} at {list(e.absolute_path)}"
                         for e in validator.iter_errors(body)]
        assert not problems, f"{method} {path} -> {r.status_code} {body}: {problems}"
        return body


@pytest.fixture
def walk(base_url):
    w = _Walk(base_url)
    yield w
    w.client.close()


def _head(base_url: str, path: str) -> bytes:
    """The raw bytes of a HEAD answer on a connection the server closes after it."""
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_health_and_readiness_answer_the_protocols_bodies(walk, base_url):
    assert walk("GET", "/v2/health/live", expect=200) == {"live": True}
    assert walk("GET", "/v2/health/ready", expect=200) == {"ready": True}
    for model in ("fraud", "digits"):
        assert walk("GET", f"/v2/models/{model}/ready", expect=200) == {"name": model, "ready": True}
        assert walk("GET", f"/v2/models/{model}/versions/1/ready", expect=200) == {"name": model, "ready": True}
    # A version the model does not serve is not ready: 503, as before, now with the body saying so.
    assert walk("GET", "/v2/models/fraud/versions/9/ready", expect=503) == {"name": "fraud", "ready": False}
    assert "no_such_model" in walk("GET", "/v2/models/no_such_model/ready", expect=404)["error"]
    # HEAD: the headers of the GET answer (its length too), and no body.
    for path, body in (("/v2/health/live", b'{"live":true}'), ("/v2/health/ready", b'{"ready":true}'),
                       ("/v2/models/fraud/ready", b'{"name":"fraud","ready":true}')):
        answer = _head(base_url, path)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n"), answer
        assert f"content-length: {len(body)}\r\n".encode() in answer.lower(), answer
        assert httpx.get(base_url + path).content == body


def test_server_and_model_metadata_conform(walk):
    for path in ("/v2", "/v2/"):
        meta = walk("GET", path, expect=200)
        assert meta["name"] == "fleet" and "binary_tensor_data" in meta["extensions"]
    for model, inputs in (("fraud", [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]),
                          ("digits", [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1]}])):
        for path in (f"/v2/models/{model}", f"/v2/models/{model}/versions/1"):
            meta = walk("GET", path, expect=200)
            assert meta["name"] == model and meta["versions"] == ["1"] and meta["inputs"] == inputs
            assert {t["datatype"] for t in meta["inputs"] + meta["outputs"]} <= DATATYPES
            assert meta["platform"] in PLATFORMS | _TRITON_PLATFORMS, meta["platform"]
    assert "no_such_model" in walk("GET", "/v2/models/no_such_model", expect=404)["error"]
    assert walk("GET", "/v2/models/fraud/versions/9", expect=404)["error"]


def _fraud(rows: int, request_id: str | None = None, **extra) -> dict:
    x = np.linspace(-1, 1, rows * 30, dtype=np.float32).reshape(rows, 30)
    doc = {"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32", "data": x.ravel().tolist()}],
           **extra}
    return doc if request_id is None else {"id": request_id, **doc}


def _binary(doc: dict, tensors: list[np.ndarray], binary_output: bool) -> tuple[bytes, dict]:
    for inp, tensor in zip(doc["inputs"], tensors):
        inp.pop("data", None)
        inp["parameters"] = {"binary_data_size": tensor.nbytes}
    doc["parameters"] = {"binary_data_output": binary_output}
    header = orjson.dumps(doc)
    return header + b"".join(t.tobytes() for t in tensors), {
        "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def test_inference_answers_conform_json_and_binary(walk):
    json_answer = walk("POST", "/v2/models/fraud/infer", expect=200, json=_fraud(3, "walk-json"))
    assert json_answer["id"] == "walk-json" and json_answer["model_name"] == "fraud"
    (out,) = json_answer["outputs"]
    assert out["shape"] == [3, 1] and len(out["data"]) == 3 and out["datatype"] in DATATYPES
    # No id sent: fleet's own in the answer (the prose returns the request's "if any"; README).
    assert walk("POST", "/v2/models/fraud/versions/1/infer", expect=200, json=_fraud(2))["id"]
    nested = _fraud(2, "walk-nested", outputs=[{"name": "probability"}])
    nested["inputs"][0]["data"] = np.asarray(nested["inputs"][0]["data"]).reshape(2, 30).tolist()
    assert walk("POST", "/v2/models/fraud/infer", expect=200, json=nested)["id"] == "walk-nested"
    image = np.arange(2 * 12 * 9, dtype=np.uint8).reshape(2, 12, 9)
    digits = walk("POST", "/v2/models/digits/versions/1/infer", expect=200, json={
        "id": "walk-digits", "inputs": [{"name": "image", "shape": [2, 12, 9], "datatype": "UINT8",
                                         "data": image.ravel().tolist()}]})
    assert digits["outputs"][0]["shape"] == [2, 10]
    # The binary tensor extension: binary in, binary out (data put back in: the same answer as JSON) ...
    x = np.linspace(-1, 1, 3 * 30, dtype=np.float32).reshape(3, 30)
    body, headers = _binary(_fraud(3, "walk-binary"), [x], binary_output=True)
    binary = walk("POST", "/v2/models/fraud/infer", expect=200, content=body, headers=headers)
    assert binary["id"] == "walk-binary"
    np.testing.assert_allclose(binary["outputs"][0]["data"], out["data"], rtol=1e-6)
    # ... and binary in, JSON out; digits' uint8 images too.
    body, headers = _binary(_fraud(3), [x], binary_output=False)
    assert "parameters" not in walk("POST", "/v2/models/fraud/infer", expect=200, content=body,
                                    headers=headers)["outputs"][0]
    body, headers = _binary({"inputs": [{"name": "image", "shape": [2, 12, 9], "datatype": "UINT8"}]}, [image], True)
    walk("POST", "/v2/models/digits/infer", expect=200, content=body, headers=headers)


def test_inference_errors_conform(walk):
    bad_shape = _fraud(1)
    bad_shape["inputs"][0]["shape"] = [1, 29]
    bad_type = _fraud(1)
    bad_type["inputs"][0]["datatype"] = "FP64"
    for path, status, kwargs, says in (
        ("/v2/models/fraud/infer", 400, {"json": bad_shape}, "shape"),
        ("/v2/models/fraud/infer", 400, {"json": bad_type}, "FP64"),
        ("/v2/models/fraud/infer", 400, {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
         "JSON"),
        ("/v2/models/fraud/infer", 400, {"json": {"inputs": []}}, "input"),
        ("/v2/models/no_such_model/infer", 404, {"json": _fraud(1)}, "no_such_model"),
        ("/v2/models/fraud/versions/9/infer", 404, {"json": _fraud(1)}, "9"),
        ("/v2/models/fraud/infer", 413, {"content": b" " * (1 << 20 | 1)}, "max_request_bytes"),
    ):
        error = walk("POST", path, expect=status, **kwargs)["error"]
        assert says.lower() in error.lower(), (path, kwargs, error)
    body, headers = _binary(_fraud(1), [np.zeros((1, 30), np.float32)], binary_output=True)
    headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    assert walk("POST", "/v2/models/fraud/infer", expect=400, content=body, headers=headers)["error"]
