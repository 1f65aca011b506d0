"""The KServe Python SDK, a second Open Inference Protocol client beside tritonclient, against the cluster.

Its `InferenceRESTClient` (protocol v2) and `InferenceGRPCClient`, from `.venv-kserve` (`make kserve-env`:
the SDK pins protobuf 4, httpx 0.27 and uvicorn 0.30, which would downgrade fleet's own), run by
tests/integration/_kserve_sdk.py in a subprocess against the live cluster; this test reads what the SDK
returned and compares it with fleet's own answers over plain HTTP.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from integration._oip import proto_rpcs, proto_service
from serving.grpc.handlers import SERVICE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
SCRIPT = Path(__file__).with_name("_kserve_sdk.py")


@pytest.fixture(scope="module")
def sdk(base_url, grpc_address) -> dict:
    """What the SDK answered for every call of the script (run once)."""
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make kserve-env` builds it (`make test` does)")
    x = np.linspace(-2, 2, 4 * 30, dtype=np.float32).reshape(4, 30)
    job = {"http": base_url, "grpc": grpc_address, "features": x.tolist(), "rpcs": proto_rpcs()}
    # -I: the SDK's venv alone on the path (not this checkout, whose `serving`/`tests` it must not see).
    done = subprocess.run([str(KSERVE_PYTHON), "-I", str(SCRIPT)], input=json.dumps(job), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout)
    fleet = httpx.post(f"{base_url}/v2/models/fraud/infer", timeout=30, json={"inputs": [
        {"name": "features", "shape": [4, 30], "datatype": "FP32", "data": x.ravel().tolist()}]}).json()
    answers["fleet_probability"] = np.asarray(fleet["outputs"][0]["data"], np.float32).reshape(4, 1)
    bad = httpx.post(f"{base_url}/v2/models/fraud/infer", timeout=30, json={"inputs": [
        {"name": "features", "shape": [4, 29], "datatype": "FP32", "data": x[:, :29].ravel().tolist()}]})
    assert bad.status_code == 400
    answers["fleet_error"] = bad.json()["error"]
    return answers


def test_rest_client_health_and_readiness(sdk):
    rest = sdk["rest"]
    # is_server_live/is_server_ready read the protocol's JSON bodies ({"live": true}, {"ready": true}).
    assert rest["live"] is True and rest["ready"] is True
    assert rest["model_ready"] is True and rest["unknown_model_ready"] is False


def test_rest_client_infers_json_and_binary_with_request_ids(sdk):
    for call, request_id in (("infer_json", "kserve-rest-json"), ("infer_binary", "kserve-rest-binary")):
        answer = sdk["rest"][call]
        assert answer["id"] == request_id and answer["model_name"] == "fraud", call
        np.testing.assert_allclose(answer["outputs"]["probability"], sdk["fleet_probability"], rtol=1e-6)
    assert sdk["rest"]["infer_binary"]["content_type"] == "application/octet-stream"


def test_rest_client_raises_fleets_error(sdk):
    error = sdk["rest"]["error"]
    assert error["status"] == 400 and sdk["fleet_error"] in error["message"]


def test_grpc_client_health_inference_and_errors(sdk):
    rpc = sdk["grpc"]
    assert rpc["live"] is True and rpc["ready"] is True and rpc["model_ready"] is True
    assert rpc["unknown_model_ready"] == "NOT_FOUND"
    for call, request_id in (("infer_raw", "kserve-grpc-raw"), ("infer_typed", "kserve-grpc-typed")):
        answer = rpc[call]
        assert answer["id"] == request_id and answer["model_name"] == "fraud", call
        np.testing.assert_allclose(answer["outputs"]["probability"], sdk["fleet_probability"], rtol=1e-6)
    assert rpc["error"] == {"code": "INVALID_ARGUMENT", "message": sdk["fleet_error"]}


def test_every_rpc_of_the_protocols_proto_is_answered(sdk):
    # The SDK's stub, the Open Inference Protocol's proto and fleet name the same service.
    assert sdk["grpc"]["service"] == proto_service() == SERVICE
    rpcs = sdk["grpc"]["rpcs"]
    assert set(rpcs) == set(proto_rpcs()) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                             "ModelMetadata", "ModelInfer"}
    # (the protocol lets a server refuse an RPC with UNIMPLEMENTED; fleet answers every one)
    assert {name: r for name, r in rpcs.items() if r["code"] != "OK"} == {}
    assert rpcs["ServerLive"]["answer"] == {"live": True} and rpcs["ServerReady"]["answer"] == {"ready": True}
    assert rpcs["ModelReady"]["answer"] == {"ready": True}
    assert rpcs["ServerMetadata"]["answer"]["name"] == "fleet"
    meta = rpcs["ModelMetadata"]["answer"]
    assert meta["name"] == "fraud" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "30"]}]
    infer = rpcs["ModelInfer"]["answer"]
    assert infer["id"] == "kserve-grpc-stub" and infer["outputs"][0]["shape"] == ["4", "1"]
    assert len(infer["rawOutputContents"]) == 1
