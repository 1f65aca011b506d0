"""The in-process baseline: the raw model's timings per batch size and the codec's per request, in-process.

Also the request handling every baseline server shares (`V2Model.answer`),
called directly: the same answers as the TorchScript file, errors as 4xx JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as httpclient

from benchmarks.baselines import measure_inprocess
from benchmarks.baselines._model import V2Model
from benchmarks.bodies import request_bodies
from training.bootstrap import bootstrap

# The baselines hand torch zero-copy, read-only views of the request body, as fleet's worker does.
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("baseline-repo")
    bootstrap(str(root), rows=2000, epochs=1, seed=3, num_threads=1, log=lambda *a, **k: None)
    return str(root)


def test_measure_inprocess_times_every_batch_size_and_the_codec(repository: str) -> None:
    threads_before = torch.get_num_threads()
    figures = measure_inprocess(repository, "fraud", batch_sizes=(1, 8, 256), duration_s=0.05)

    assert json.loads(json.dumps(figures)) == figures  # what the harness writes to its report
    assert figures["model"] == "fraud" and figures["version"] == 1 and figures["threads"] == 1
    assert torch.get_num_threads() == threads_before
    assert set(figures["batches"]) == {"1", "8", "256"}
    for batch in figures["batches"].values():
        assert batch["calls"] > 0 and batch["rows_per_s"] > 0
        assert 0 < batch["p50_us"] <= batch["p95_us"] <= batch["p99_us"]
        assert batch["mean_us"] > 0
    # A batch of 256 costs a few times one row, not 256 times: the reason to batch at all.
    assert figures["batches"]["256"]["rows_per_s"] > 10 * figures["batches"]["1"]["rows_per_s"]

    bodies = request_bodies(repository, "fraud", rows=1)
    for kind in ("json", "binary"):
        codec = figures["codec"][kind]
        assert codec["request_bytes"] == len(bodies[kind][0])
        assert codec["calls"] > 0 and 0 < codec["p50_us"] <= codec["p99_us"]
        steps = codec["decode_mean_us"] + codec["validate_mean_us"] + codec["encode_mean_us"]
        assert 0 < steps <= codec["mean_us"] * 1.01
    # 30 floats as text against 120 raw bytes.
    assert figures["codec"]["json"]["request_bytes"] > figures["codec"]["binary"]["request_bytes"]


@pytest.mark.parametrize("sizes", [(0,), (1, 512), ()])
def test_measure_inprocess_rejects_batch_sizes_the_model_cannot_take(repository: str, sizes) -> None:
    with pytest.raises(ValueError, match="batch sizes .* not allowed: use 1..256"):
        measure_inprocess(repository, "fraud", batch_sizes=sizes, duration_s=0.01)


@pytest.fixture(scope="module")
def model(repository: str) -> V2Model:
    return V2Model(repository, "fraud")


def _expected(repository: str, rows: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(Path(repository) / "fraud" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(rows)).numpy()


@pytest.mark.parametrize("kind", ["json", "binary"])
def test_baseline_answer_matches_the_torchscript_file(repository: str, model: V2Model, kind: str) -> None:
    body, header_length = request_bodies(repository, "fraud", rows=3)[kind]
    status, answer, headers = model.answer("fraud", None, body, None if header_length is None else str(header_length))

    assert status == 200
    got = httpclient.InferenceServerClient.parse_response_body(
        answer, header_length=int(headers.get("inference-header-content-length", 0)) or None
    )
    if header_length is None:
        rows = np.asarray(orjson.loads(body)["inputs"][0]["data"], dtype=np.float32).reshape(3, 30)
    else:
        rows = np.frombuffer(body[header_length:], dtype="<f4").reshape(3, 30)
    np.testing.assert_allclose(got.as_numpy("probability"), _expected(repository, rows), rtol=0, atol=1e-6)
    assert got.get_response()["model_version"] == "1"


@pytest.mark.parametrize(
    ("model_name", "version", "body", "header_length", "status", "message"),
    [
        ("fraud", None, b'{"inputs": [', None, 400, "malformed JSON"),
        ("fraud", None, b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 29], '
         b'"data": [' + b", ".join([b"0.5"] * 29) + b"]}]}", None, 400, "does not match"),
        ("fraud", None, b"{}", "x", 400, "Inference-Header-Content-Length"),
        ("other", None, b"{}", None, 404, "unknown model 'other'"),
        ("fraud", "7", b"{}", None, 404, "no version '7'"),
    ],
    ids=["malformed-json", "wrong-shape", "bad-header", "unknown-model", "unknown-version"],
)
def test_baseline_answer_turns_bad_requests_into_json_errors(
    model: V2Model, model_name, version, body, header_length, status, message
) -> None:
    got_status, answer, headers = model.answer(model_name, version, body, header_length)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert message in orjson.loads(answer)["error"]
