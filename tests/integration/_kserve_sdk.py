"""The KServe Python SDK against a running fleet, run by `.venv-kserve/bin/python` (test_kserve_client.py).

The job arrives as JSON on stdin (`http`: base URL, `grpc`: host:port, `features`: fraud's input rows,
`rpcs`: the RPC names of the Open Inference Protocol's proto); what the SDK returned is printed as JSON
on stdout. Nothing of fleet is imported: the SDK's venv has none of fleet's packages.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import httpx
import numpy as np
from google.protobuf import json_format
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput


def _request(x: np.ndarray, request_id: str | None, binary: bool, binary_output: bool = False) -> InferRequest:
    features = InferInput("features", list(x.shape), "FP32")
    features.set_data_from_numpy(x, binary_data=binary)
    outputs = [RequestedOutput("probability", {"binary_data": True})] if binary_output else None
    return InferRequest("fraud", [features], request_id=request_id, request_outputs=outputs)


def _answer(response) -> dict:
    return {"id": response.id, "model_name": response.model_name,
            "outputs": {out.name: out.as_numpy().tolist() for out in response.outputs}}


async def _rest(url: str, x: np.ndarray) -> dict:
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=30)) as client:
        out = {"live": await client.is_server_live(url), "ready": await client.is_server_ready(url),
               "model_ready": await client.is_model_ready(url, "fraud"),
               "unknown_model_ready": await client.is_model_ready(url, "no_such_model")}
        out["infer_json"] = _answer(await client.infer(url, _request(x, "kserve-rest-json", False), "fraud"))
        headers: dict = {}
        response = await client.infer(url, _request(x, "kserve-rest-binary", True, binary_output=True), "fraud",
                                      response_headers=headers)
        out["infer_binary"] = {**_answer(response), "content_type": headers.get("content-type")}
        try:
            await client.infer(url, _request(x[:, :29], None, False), "fraud")
            out["error"] = None
        except httpx.HTTPStatusError as exc:
            out["error"] = {"status": exc.response.status_code, "message": str(exc)}
    return out


async def _grpc(address: str, x: np.ndarray, rpcs: list[str]) -> dict:
    client = InferenceGRPCClient(address, timeout=30)
    try:
        out = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
               "model_ready": await client.is_model_ready("fraud")}
        try:
            out["unknown_model_ready"] = await client.is_model_ready("no_such_model")
        except grpc.RpcError as exc:
            out["unknown_model_ready"] = exc.code().name
        out["infer_raw"] = _answer(await client.infer(_request(x, "kserve-grpc-raw", True)))
        out["infer_typed"] = _answer(await client.infer(_request(x, "kserve-grpc-typed", False)))
        try:
            await client.infer(_request(x[:, :29], None, True))
            out["error"] = None
        except grpc.RpcError as exc:
            out["error"] = {"code": exc.code().name, "message": exc.details()}
    finally:
        await client.close()
    out["service"] = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    out["rpcs"] = await _every_rpc(address, x, rpcs)
    return out


async def _every_rpc(address: str, x: np.ndarray, rpcs: list[str]) -> dict:
    """Each RPC through the SDK's generated stub: its answer as JSON, or the status it was refused with."""
    requests = {"ModelReady": pb.ModelReadyRequest(name="fraud"), "ModelMetadata": pb.ModelMetadataRequest(name="fraud"),
                "ModelInfer": _request(x, "kserve-grpc-stub", True).to_grpc()}
    answers = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for name in rpcs:
            request = requests.get(name) or getattr(pb, f"{name}Request")()
            try:
                answer = await getattr(stub, name)(request, timeout=30)
                answers[name] = {"code": "OK", "answer": json_format.MessageToDict(answer)}
            except grpc.RpcError as exc:
                answers[name] = {"code": exc.code().name, "message": exc.details()}
    return answers


async def main() -> None:
    job = json.load(sys.stdin)
    x = np.asarray(job["features"], dtype=np.float32)
    result = {"rest": await _rest(job["http"], x), "grpc": await _grpc(job["grpc"], x, job["rpcs"])}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
