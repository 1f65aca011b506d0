"""Auth and the admin endpoints through fleet's HTTP handler (no sockets): a real repository and TorchScript model."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from starlette.routing import Route

from serving.auth import UNAUTHORIZED_MESSAGE, key_digest
from serving.http_api import build_handler, build_http_app, build_starlette_app
from serving.http_server import HttpRequest
from serving.model_config import TensorSpec, make_config
from serving.options import ServingOptions
from serving.registry import SERVING_FILE, ModelRepository, ServingState
from serving.service import InferenceService
from serving.workers import LocalWorkerClient, ModelRunner

MODEL = "m"
KEY, OTHER_KEY, ADMIN = "inference-key-1", "inference-key-2", "admin-token-1"


class Scaled(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x[:, :2]


def _publish(repo: ModelRepository, version: int) -> None:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Scaled(float(version))), buf)
    config = make_config(MODEL, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8)
    repo.publish(MODEL, {"model.pt": buf.getvalue()}, {}, config=config, version=version)


_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}).encode()


class Client:
    """Calls the handler as fleet's HTTP server does, one request at a time."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, method: str, path: str, body: bytes = b"", token: str | None = None,
                       client=("10.0.0.7", 40000)):
        headers = [(b"content-type", b"application/json")]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        status, out, payload = await self.handler(HttpRequest(method, path, b"", headers, body, client))
        out = {k.decode(): v.decode() for k, v in out}
        if payload and out.get("content-type", "").startswith("text/plain"):
            return status, out, payload.decode()
        return status, out, json.loads(payload) if payload else None

    async def infer(self, token: str | None = KEY, version: str | None = None):
        path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
        return await self("POST", path, _BODY, token)


@pytest.fixture
async def served(tmp_path):
    """A service over a repository holding versions 1 and 2 (latest: 1 serves 2), keys and an admin token set."""
    repo = ModelRepository(str(tmp_path / "repo"))
    _publish(repo, 1)
    _publish(repo, 2)
    options = ServingOptions(repository=repo.root_uri, api_key_digests=(key_digest(KEY), key_digest(OTHER_KEY)),
                             admin_token_digest=key_digest(ADMIN), rate_limit_rps=1000.0, rate_limit_burst=1000,
                             version_retire_grace_s=0.0)
    async with _serving(repo, options, poll=True) as (service, call):
        yield repo, service, call


@contextlib.asynccontextmanager
async def _serving(repo: ModelRepository, options: ServingOptions, *, poll: bool = False):
    """The model served from `repo` under `options` in this process: (service, a Client of its handler)."""
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    spec, cfg = repo.load_config(MODEL)
    service = InferenceService({MODEL: (spec, cfg, LocalWorkerClient(runner))}, options)
    if poll:
        runner.start_polling(0, lambda: service.refresh(models=(MODEL,)))
    await service.refresh()
    try:
        yield service, Client(build_handler(service))
    finally:
        await service.close()
        await runner.close()


async def test_inference_needs_a_key_and_every_wrong_one_gets_the_same_401(served):
    _, _, call = served
    status, headers, doc = await call.infer(KEY)
    assert status == 200 and doc["model_version"] == "2" and doc["outputs"][0]["data"] == [2.0, 2.0]
    assert (await call.infer(OTHER_KEY))[0] == 200 and (await call.infer(ADMIN))[0] == 200
    refused = [await call.infer(token) for token in (None, "nope", KEY + "x", "")]
    for status, headers, doc in refused:
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert doc == {"error": UNAUTHORIZED_MESSAGE}
    # The Starlette routes under the same rule, the open ones open.
    for method, path in (("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/config"),
                         ("GET", "/metrics"), ("POST", "/v2/repository/index"), ("GET", "/v2/models/stats")):
        assert (await call(method, path))[0] == 401, path
    assert (await call("GET", f"/v2/models/{MODEL}", token=KEY))[0] == 200
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert (await call("GET", path))[0] == 200, path


async def test_admin_needs_the_admin_token_and_an_inference_key_gets_403(served):
    _, _, call = served
    unload = f"/v2/repository/models/{MODEL}/unload"
    status, headers, doc = await call("POST", unload, b"{}", KEY)
    assert status == 403 and "may not call" in doc["error"]
    for token in (None, "wrong"):
        status, headers, doc = await call("POST", unload, b"{}", token)
        assert status == 401 and doc == {"error": UNAUTHORIZED_MESSAGE} and "www-authenticate" in headers
    assert (await call.infer())[0] == 200  # nothing changed


async def test_unload_answers_503_everywhere_ignores_it_in_server_readiness_and_load_brings_it_back(served, caplog):
    repo, service, call = served
    audit = logging.getLogger("fleet.audit")  # it writes to stderr and does not propagate: listen to it directly
    audit.addHandler(caplog.handler)
    try:
        await _unload_and_load(repo, call)
    finally:
        audit.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name == "fleet.audit"]
    assert len(lines) == 2 and "admin unload model=m" in lines[0] and "admin load model=m" in lines[1]
    assert '"loaded": true' in lines[0] and '"loaded": false' in lines[0] and "client=10.0.0.7:40000" in lines[0]
    assert not any(secret in line for line in lines for secret in (ADMIN, KEY, key_digest(ADMIN)[7:]))


async def _unload_and_load(repo, call) -> None:
    status, _, doc = await call("POST", f"/v2/repository/models/{MODEL}/unload",
                                b'{"parameters": {"unload_dependents": false}}', ADMIN)
    assert status == 200 and doc["loaded"] is False and doc["served_versions"] == [] and doc["ready"] is False
    assert json.loads((Path(repo.root) / MODEL / SERVING_FILE).read_text())["loaded"] is False  # for every replica
    status, headers, doc = await call.infer()
    assert status == 503 and "unloaded by an administrator" in doc["error"]
    assert (await call("GET", f"/v2/models/{MODEL}/ready"))[0] == 503
    assert (await call("GET", "/v2/health/ready"))[0] == 200  # the server is ready: the model is meant to be off
    index = (await call("POST", "/v2/repository/index", token=KEY))[2]
    assert index == [{"name": MODEL, "state": "UNAVAILABLE", "reason": "unloaded by an administrator"}]
    status, _, doc = await call("POST", f"/v2/repository/models/{MODEL}/load", b"", ADMIN)
    assert status == 200 and doc["loaded"] is True and doc["served_versions"] == ["2"] and doc["ready"]
    assert (await call.infer())[0] == 200


async def test_a_pin_switches_the_served_versions_and_null_follows_the_policy_again(served):
    repo, service, call = served
    path = f"/v2/admin/models/{MODEL}/versions"
    status, _, doc = await call("POST", path, b'{"versions": [1]}', ADMIN)
    assert status == 200 and doc["versions"] == [1] and doc["served_versions"] == ["1"]
    status, _, doc = await call.infer()
    assert doc["model_version"] == "1" and doc["outputs"][0]["data"] == [1.0, 1.0]
    assert repo.served_versions(MODEL) == [1] and repo.serving_state(MODEL) == ServingState(True, (1,))
    _publish(repo, 3)  # a newer version does not move a pin
    assert await service.models[MODEL].worker.runner.versions.sync() is False
    assert (await call.infer())[2]["model_version"] == "1"
    status, _, doc = await call("POST", path, b'{"versions": [1, 2]}', ADMIN)
    assert doc["served_versions"] == ["1", "2"] and (await call.infer(version="1"))[0] == 200
    status, _, doc = await call("POST", path, b'{"versions": null}', ADMIN)
    assert status == 200 and doc["versions"] is None and doc["served_versions"] == ["3"]


@pytest.mark.parametrize("body, message", [
    (b'{"versions": [7, 1, 9]}', "no published version 7, 9; published versions: [1, 2]"),
    (b'{"versions": []}', "at least 1 item"),
    (b'{"versions": [0]}', "greater than or equal to 1"),
    (b'{"versions": ["1"]}', "valid integer"),
    (b'{"versions": [1.5]}', "valid integer"),
    (b'{"version": [1]}', "versions: Field required"),
    (b'{"versions": [1], "x": 1}', "Extra inputs"),
    (b"not json", "invalid request body"),
    (b'{"versions": [1e400]}', "invalid request body"),
])
async def test_a_bad_version_change_is_a_400_that_says_why_and_changes_nothing(served, body, message):
    repo, _, call = served
    status, _, doc = await call("POST", f"/v2/admin/models/{MODEL}/versions", body, ADMIN)
    assert status == 400 and message in doc["error"], doc
    assert repo.serving_state(MODEL) == ServingState()


@pytest.mark.parametrize("body", [b'{"parameters": {"config": "{}"}}',
                                  b'{"parameters": {"file:1/model.pt": "AAAA"}}', b'{"weights": 1}'])
async def test_load_takes_nothing_from_the_request_triton_overrides_are_refused(served, body):
    repo, _, call = served
    status, _, doc = await call("POST", f"/v2/repository/models/{MODEL}/load", body, ADMIN)
    assert status == 400 and ("only from its repository" in doc["error"] or "Extra inputs" in doc["error"])
    assert repo.serving_state(MODEL) == ServingState()


@pytest.mark.parametrize("name", ["..", "../m", "../../etc", "..\x00", "m\x00", "/etc", "a/b", "%2e%2e", "a%2Fb",
                                  "m\n", "other"])
async def test_names_from_requests_never_reach_outside_the_repository(served, tmp_path, name):
    repo, _, call = served
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for path in (f"/v2/repository/models/{name}/unload", f"/v2/admin/models/{name}/versions",
                 f"/v2/models/{name}/infer"):
        status, _, doc = await call("POST", path, b'{"versions": [1]}', ADMIN)
        assert status in (404, 400), (path, status, doc)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


async def test_a_key_over_its_rate_gets_429_with_retry_after_at_once_other_keys_do_not(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    _publish(repo, 1)
    options = ServingOptions(repository=repo.root_uri, api_key_digests=(key_digest(KEY), key_digest(OTHER_KEY)),
                             rate_limit_rps=0.5, rate_limit_burst=3)
    async with _serving(repo, options) as (_, call):
        answers = [await call.infer(KEY) for _ in range(5)]
        assert [a[0] for a in answers] == [200, 200, 200, 429, 429]
        assert answers[3][1]["retry-after"] == "2" and "rate limit" in answers[3][2]["error"]
        assert (await call.infer(OTHER_KEY))[0] == 200
        assert (await call("GET", f"/v2/models/{MODEL}", token=KEY))[0] == 429  # the same bucket on every route
        assert (await call.infer("wrong"))[0] == 401  # refused before it counts


async def test_without_keys_or_token_inference_is_open_and_admin_is_off(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    _publish(repo, 1)
    async with _serving(repo, ServingOptions(repository=repo.root_uri)) as (_, call):
        assert (await call.infer(None))[0] == 200
        status, _, doc = await call("POST", f"/v2/repository/models/{MODEL}/unload", b"", "anything")
        assert status == 403 and "admin endpoints are disabled" in doc["error"]
        assert (await call.infer(None))[0] == 200


async def test_an_unloaded_model_stays_unloaded_when_a_replica_starts(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    _publish(repo, 1)
    repo.write_serving_state(MODEL, ServingState(False))
    runner = await ModelRunner.load(repo.root_uri, MODEL)  # no error: nothing is meant to be loaded
    try:
        status = await runner.status()
        assert status["versions"] == [] and status["unloaded"] is True and runner.versions.backends == {}
        repo.write_serving_state(MODEL, ServingState(True))
        assert await runner.versions.sync()
        assert (await runner.status())["versions"] == [1]
    finally:
        await runner.close()


async def test_the_openapi_document_says_which_routes_ask_for_credentials(served):
    """With keys configured every route the document marks apiKey/adminToken answers 401 without credentials,
    and every other route answers without them."""
    _, service, call = served
    status, _, doc = await call("GET", "/openapi.json")
    assert status == 200 and set(doc["components"]["securitySchemes"]) == {"apiKey", "adminToken"}
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            concrete = path.replace("{model}", MODEL).replace("{version}", "2")
            status, headers, _ = await call(method.upper(), concrete, _BODY if method == "post" else b"")
            if op.get("security"):
                assert status == 401 and "401" in op["responses"] and "www-authenticate" in headers, path
            else:
                assert status != 401 and "401" not in op["responses"], path
            checked += 1
    routes = [r for r in build_starlette_app(service).routes if isinstance(r, Route)]
    assert checked == sum(len(r.methods - {"HEAD"}) for r in routes)


async def test_the_asgi_front_end_refuses_a_request_without_a_key_before_reading_its_body(served):
    """Serve's HAProxy/proxy mode (build_http_app): the same 401, and the body is never read."""
    _, service, _ = served
    app = build_http_app(service)
    sent = []

    async def receive():
        raise AssertionError("the body of an unauthenticated request was read")

    async def send(message):
        sent.append(message)

    for headers in ([], [(b"authorization", b"Bearer nope")]):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": f"/v2/models/{MODEL}/infer", "headers": headers,
                 "client": ("10.0.0.9", 1234), "query_string": b"", "root_path": ""}
        await app(scope, receive, send)
        start, body = sent
        assert start["status"] == 401 and (b"www-authenticate", b'Bearer realm="fleet"') in start["headers"]
        assert json.loads(body["body"]) == {"error": UNAUTHORIZED_MESSAGE}
    chunks = [{"type": "http.request", "body": _BODY, "more_body": False}]

    async def receive_body():
        return chunks.pop(0)

    sent.clear()
    scope["headers"] = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]
    await app(scope, receive_body, send)
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["model_version"] == "2"


async def test_kuberays_probe_gets_success_while_ready_and_a_503_naming_the_model_while_not(served, monkeypatch):
    _, service, call = served

    async def healthz():
        status, headers, payload = await call.handler(HttpRequest("GET", "/-/healthz", b"", [], b"", None))
        return status, payload

    assert await healthz() == (200, b"success")  # open (no key), the body KubeRay's probe compares

    async def restarting():
        raise RuntimeError("the worker is restarting")

    monkeypatch.setattr(service.models[MODEL].worker, "status", restarting)
    await service.refresh()
    status, payload = await healthz()
    assert status == 503 and json.loads(payload) == {
        "error": f"not ready: model {MODEL!r}: RuntimeError: the worker is restarting"}
    status, _, body = await call("GET", "/v2/health/ready")  # the same readiness, in the protocol's body
    assert (status, body) == (503, {"ready": False})
    status, _, body = await call("GET", f"/v2/models/{MODEL}/ready")
    assert (status, body) == (503, {"name": MODEL, "ready": False})
    monkeypatch.undo()  # the worker answers again: the probe asks it once more before answering
    assert await healthz() == (200, b"success")
