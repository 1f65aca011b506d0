"""The OpenAPI document (serving/openapi.py) covers every route of the Starlette app, and only those.

A route added to `build_starlette_app` without its entry in `serving.openapi.OPERATIONS`
fails here: the document served at /openapi.json is what schemathesis fuzzes.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
from starlette.routing import Route

from serving.http_api import build_starlette_app, call_asgi
from serving.http_server import HttpRequest
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.openapi import OPERATIONS, openapi_document
from serving.options import ServingOptions
from serving.service import SERVER_VERSION, InferenceService


class _Worker:
    async def infer(self, version: int, inputs: dict) -> dict:
        return {"y": inputs["x"]}

    async def status(self) -> dict:
        return {"versions": [1]}


def _app():
    config = make_config("m", [TensorSpec("x", "FP32", (2,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8)
    service = InferenceService({"m": (spec_from_config(config), config, _Worker())},
                               ServingOptions(repository="/nonexistent"))
    return build_starlette_app(service)


def _routes(app) -> set[tuple[str, str]]:
    # Starlette answers HEAD on every GET route by itself: not an operation of ours.
    return {(method, route.path) for route in app.routes if isinstance(route, Route)
            for method in route.methods if method != "HEAD"}


def _documented(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def test_every_route_is_in_the_document_and_nothing_else():
    app = _app()
    doc = openapi_document(SERVER_VERSION)
    routes, documented = _routes(app), _documented(doc)
    assert routes - documented == set(), "routes without an entry in serving.openapi.OPERATIONS"
    assert documented - routes == set(), "OPERATIONS entries without a route"
    assert all(isinstance(r, Route) for r in app.routes), "a Mount or WebSocket route: document it here too"


def _refs(value):
    if isinstance(value, dict):
        if "$ref" in value:
            yield value["$ref"]
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def test_the_document_is_consistent_openapi_3():
    doc = openapi_document("1.2.3")
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == "1.2.3"
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for schema in schemas.values():
        jsonschema.Draft7Validator.check_schema(schema)
    ids = [op.operation_id for op in OPERATIONS]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            # Every path parameter of the template is declared, and every operation can answer 500.
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}, (method, path)
            assert "500" in op["responses"]
            for status, response in op["responses"].items():
                assert response["description"]
                content = response.get("content", {})
                if int(status) >= 400 and content:  # every error body has the one shape
                    if status == "503" and path.endswith("/ready"):  # but "not ready": the protocol's ready body
                        assert content == op["responses"]["200"]["content"], (method, path)
                        continue
                    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def test_the_infer_operation_takes_json_and_the_binary_extension():
    op = openapi_document("x")["paths"]["/v2/models/{model}/versions/{version}/infer"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
    assert "Inference-Header-Content-Length" in headers
    assert {"200", "400", "404", "413", "500", "503", "504"} <= set(op["responses"])


def test_a_v2_request_validates_against_the_request_schema():
    doc = openapi_document("x")
    # The schema with the document's components beside it, so its $refs resolve.
    validator = jsonschema.Draft7Validator({**doc["components"]["schemas"]["InferenceRequest"],
                                            "components": doc["components"]})
    good = {"id": "a", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[1.0, 2.0]]}],
            "parameters": {"timeout": 1000}}
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({"inputs": [{"name": "x", "shape": [-1], "datatype": "FLOAT"}]}))


def test_the_app_serves_the_document_at_openapi_json():
    app = _app()
    request = HttpRequest("GET", "/openapi.json", b"", [], b"")
    status, headers, body = asyncio.run(call_asgi(app, request))
    assert status == 200 and (b"content-type", b"application/json") in headers
    assert json.loads(body) == json.loads(json.dumps(openapi_document(SERVER_VERSION)))



def test_health_answers_carry_the_protocol_bodies_the_document_describes():
    # The Open Inference Protocol's health bodies (inference_rest.md), which the KServe SDK reads.
    app, doc = _app(), openapi_document(SERVER_VERSION)
    for path, template, status, body in (
        ("/v2/health/live", "/v2/health/live", 200, {"live": True}),
        ("/v2/health/ready", "/v2/health/ready", 200, {"ready": True}),
        ("/v2/models/m/ready", "/v2/models/{model}/ready", 200, {"name": "m", "ready": True}),
        ("/v2/models/m/versions/9/ready", "/v2/models/{model}/versions/{version}/ready", 503,
         {"name": "m", "ready": False}),
    ):
        got_status, headers, got = asyncio.run(call_asgi(app, HttpRequest("GET", path, b"", [], b"")))
        assert (got_status, json.loads(got)) == (status, body), path
        assert (b"content-type", b"application/json") in headers
        schema = doc["paths"][template]["get"]["responses"][str(status)]["content"]["application/json"]["schema"]
        jsonschema.Draft7Validator({**schema, "components": doc["components"]}).validate(body)
