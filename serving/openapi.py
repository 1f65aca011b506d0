"""fleet's OpenAPI 3 document, served at `GET /openapi.json`, built from the table `OPERATIONS`.

One `Operation` per route of `serving.http_api.build_starlette_app` (path and
method), with the statuses it can answer: a route added there is one entry
added here (tests/unit/test_openapi.py fails until it is). Errors all have one
shape, `{"error": "..."}` (`serving.http_api.error_response`); a ready route's 503
("not ready") carries its ready body, as the Open Inference Protocol defines it. The infer routes
take the KServe v2 JSON request or the binary tensor extension
(`application/octet-stream`: a JSON header of `Inference-Header-Content-Length`
bytes, then the raw tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.datatypes import V2_TO_NUMPY

__all__ = ["Operation", "OPERATIONS", "SCHEMAS", "SECURITY_SCHEMES", "openapi_document"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_STRING_ARRAY = {"type": "array", "items": {"type": "string"}}
_TENSOR_META = {
    "type": "object", "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                   "shape": {"type": "array", "items": {"type": "integer"}}},
}

SCHEMAS: dict[str, dict] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
              "additionalProperties": False},
    "Datatype": {"type": "string", "enum": sorted(V2_TO_NUMPY)},
    "Parameters": {"type": "object", "description": "v2 parameters: names to booleans, numbers or strings",
                   "additionalProperties": {"anyOf": [{"type": "boolean"}, {"type": "number"}, {"type": "string"}]}},
    # Tensor data: flat or nested (row-major) lists of numbers, booleans or strings (BYTES).
    "TensorData": {"type": "array",
                   "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "string"}, _ref("TensorData")]}},
    "RequestInput": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 16},
            "datatype": _ref("Datatype"),
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0,
                                     "description": "bytes of this input's raw data after the JSON header"}}},
            "data": _ref("TensorData"),
        },
    },
    "RequestOutput": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"},
                       "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}},
    },
    "InferenceRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "timeout": {"type": "integer", "minimum": 0,
                            "description": "µs this request may wait in the queue (shortens the default)"},
                "binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": _ref("Datatype"),
                       "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                       "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
                       "data": _ref("TensorData")},
    },
    "InferenceResponse": {
        "type": "object", "required": ["model_name", "model_version", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string"}, "parameters": {"type": "object"},
                       "outputs": {"type": "array", "items": _ref("ResponseOutput")}},
    },
    # Health bodies as the Open Inference Protocol's prose (inference_rest.md) defines them.
    "ServerLive": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ServerReady": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {"type": "object", "required": ["name", "ready"],
                   "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "ServerMetadata": {
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": _STRING_ARRAY,
                       "native_kernels": {"type": "string", "enum": ["native", "numpy"]}},
    },
    "ModelMetadata": {
        "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {"name": {"type": "string"}, "versions": _STRING_ARRAY, "platform": {"type": "string"},
                       "inputs": {"type": "array", "items": _TENSOR_META},
                       "outputs": {"type": "array", "items": _TENSOR_META}},
    },
    "ModelConfig": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}},
                    "description": "Triton's ModelConfig as JSON (protobuf field names)"},
    "ModelStatistics": {"type": "object", "required": ["model_stats"],
                        "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}},
                        "description": "Triton's statistics extension, cluster-wide"},
    "ModelFeatures": {
        "type": "object", "required": ["model_name", "model_version", "rows", "features"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "rows": {"type": "integer", "minimum": 0}, "bins": {"type": "string"},
                       "features": {"type": "array", "items": {"type": "object"}}},
    },
    "FeedbackRequest": {
        "type": "object",
        "description": "true labels of logged predictions: a list of {id, row?, label} (a list label gives every "
        "row of the request), or the v2 tensors 'id' (BYTES [n]), 'label' ([n]) and optionally 'row' ([n])",
        "properties": {
            "labels": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["id", "label"], "additionalProperties": False,
                "properties": {"id": {"type": "string", "minLength": 1},
                               "row": {"type": "integer", "minimum": 0},
                               "label": {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "boolean"},
                                                   {"type": "array", "minItems": 1,
                                                    "items": {"anyOf": [{"type": "integer"}, {"type": "number"},
                                                                        {"type": "boolean"}]}}]}}}},
            "inputs": {"type": "array", "minItems": 2, "items": _ref("RequestInput")},
        },
    },
    "FeedbackResponse": {
        "type": "object", "required": ["model_name", "accepted", "duplicates"],
        "properties": {"model_name": {"type": "string"}, "accepted": {"type": "integer", "minimum": 0},
                       "duplicates": {"type": "integer", "minimum": 0,
                                      "description": "labels of an (id, row) given again in the body: the last won"},
                       "task": {"type": "string", "enum": ["binary", "multiclass", "regression"]}},
    },
    "DriftReport": {
        "type": "object", "required": ["model_name", "versions"],
        "description": "per version: every stream (feature, score, pca) with its window statistics (PSI, "
        "Jensen-Shannon distance) and their thresholds, the sequential statistic, state and since when; the "
        "label-error detector",
        "properties": {"model_name": {"type": "string"}, "versions": {"type": "object"}},
    },
    "QualityReport": {
        "type": "object", "required": ["model_name", "versions"],
        "description": "per version: accuracy, ROC AUC, label error rate and calibration over the latest labelled "
        "predictions and over a time window, from the prediction log joined with the feedback",
        "properties": {"model_name": {"type": "string"}, "versions": {"type": "object"},
                       "labels": {"type": "object"}},
    },
    "AdminState": {
        "type": "object", "required": ["model", "loaded", "versions", "served_versions"],
        "description": "the model's serving.json after the call, and what the replica that took it serves now",
        "properties": {"model": {"type": "string"}, "loaded": {"type": "boolean"},
                       "versions": {"type": "array", "items": {"type": "integer"}, "nullable": True,
                                    "description": "the pinned versions; null: the config's version_policy"},
                       "served_versions": _STRING_ARRAY, "ready": {"type": "boolean"},
                       "poll_interval_s": {"type": "number"}},
    },
    "VersionsRequest": {
        "type": "object", "required": ["versions"], "additionalProperties": False,
        "properties": {"versions": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1,
                                    "maxItems": 1024, "nullable": True}},
    },
    "RolloutState": {
        "type": "object", "required": ["model", "status", "stable", "candidate", "weight", "epoch"],
        "description": "the model's rollout.json (serving/rollout/state.py), its settings and decisions",
        "properties": {"model": {"type": "string"},
                       "status": {"type": "string", "enum": ["idle", "canary", "shadow", "paused"]},
                       "stable": {"type": "integer", "nullable": True},
                       "candidate": {"type": "integer", "nullable": True},
                       "stage": {"type": "integer"}, "stages": {"type": "array", "items": {"type": "number"}},
                       "weight": {"type": "number", "description": "share of routing keys the candidate answers"},
                       "shadow_share": {"type": "number"}, "epoch": {"type": "integer"},
                       "rolled_back": {"type": "array", "items": {"type": "integer"}},
                       "evidence": {"type": "object", "description": "the judge's latest verdict, per gate"},
                       "alarm": {"type": "string", "nullable": True},
                       "history": {"type": "array", "items": {"type": "object"}},
                       "config": {"type": "object"}, "decisions": {"type": "object"}},
    },
    "RolloutRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"version": {"type": "integer", "minimum": 1,
                                   "description": "start only: the version to roll out (default the newest)"},
                       "mode": {"type": "string", "enum": ["canary", "shadow", "ab"],
                                "description": "start only: default the model's fleet.rollout"},
                       "split": {"type": "number", "minimum": 0, "maximum": 1,
                                 "description": "start with mode ab only: the candidate's fixed share, in (0, 1)"}},
    },
    "RepositoryIndex": {
        "type": "array",
        "items": {"type": "object", "required": ["name", "state"],
                  "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                 "state": {"type": "string", "enum": ["READY", "UNAVAILABLE"]},
                                 "reason": {"type": "string"}}},
    },
}

# name -> OpenAPI security scheme; an Operation's `security` names them (serving/auth.py says who needs what).
SECURITY_SCHEMES: dict[str, dict] = {
    "apiKey": {"type": "http", "scheme": "bearer",
               "description": "an API key (`api_keys`), or the admin token; asked only when the server has keys"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "the admin token (`admin_token`); with none configured the admin endpoints "
                   "answer 403"},
}
_KEY, _ADMIN = ("apiKey",), ("adminToken",)

_HEADER_LENGTH = "Inference-Header-Content-Length"
_WHY = {
    400: "the request is malformed, over a limit, or does not match the model's inputs",
    401: "missing or invalid credentials (WWW-Authenticate: Bearer); the same answer whatever was wrong",
    403: "the credentials may not call this endpoint, or admin endpoints are off (no admin_token configured)",
    404: "no such model or version",
    413: "the body is over max_request_bytes",
    500: "an unexpected error (logged with the request id the message gives)",
    503: "overloaded (Retry-After), loading, shutting down, or the backend is down",
    504: "the request's queue timeout ran out before it was computed",
    429: "the API key (or client address) is over rate_limit_rps; Retry-After says when to retry",
}


def _error(status: int, why: str | None = None) -> dict:
    return {"description": why or _WHY.get(status, "error"),
            "content": {"application/json": {"schema": _ref("Error")}}}


def _ok(schema: str | None = None, why: str = "OK") -> dict:
    return {"description": why} if schema is None else {
        "description": why, "content": {"application/json": {"schema": _ref(schema)}}}


def _path(name: str, why: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
            "description": why}


_MODEL = _path("model", "the model's name")
_VERSION = _path("version", "a version number the model serves")

_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _ref("InferenceRequest")},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": f"binary tensor extension: the InferenceRequest JSON of {_HEADER_LENGTH} bytes, then "
            "the raw little-endian tensors of the inputs with parameters.binary_data_size, in input order",
        },
    },
}
_INFER_HEADERS = (
    {"name": _HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
     "description": "bytes of JSON before the binary tensors (binary tensor extension)"},
    {"name": "Content-Encoding", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["identity", "gzip", "deflate"]}},
)
_INFER_OK = {
    "description": "the outputs; binary ones after the JSON header when asked for",
    "headers": {_HEADER_LENGTH: {"schema": {"type": "integer"},
                                 "description": "bytes of JSON before the binary outputs (when any)"},
                "Fleet-Fallback": {"schema": {"type": "string"},
                                   "description": "<model>/<version> of the fallback that answered, if one did"}},
    "content": {"application/json": {"schema": _ref("InferenceResponse")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _ready(schema: str) -> dict[int, dict]:
    """A health route's answers: the same body for ready (200) and not ready (503), `ready` saying which."""
    return {200: _ok(schema, "ready"), 503: _ok(schema, "not ready")}


_REPOSITORY_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"parameters": {"type": "object", "description": "Triton's; fleet takes none but unload's "
                                  "unload_dependents", "properties": {"unload_dependents": {"type": "boolean"}},
                                  "additionalProperties": False}}}}}}


@dataclass(frozen=True)
class Operation:
    """One route and method: what it takes and every status it can answer (500 is added to all)."""

    method: str
    path: str
    operation_id: str
    summary: str
    responses: dict[int, dict]
    parameters: tuple[dict, ...] = ()
    request_body: dict | None = None
    security: tuple[str, ...] = ()  # names in SECURITY_SCHEMES
    tags: tuple[str, ...] = ("inference",)

    def document(self, api_keys: bool = False) -> dict:
        """This operation's entry; `api_keys`: the server asks for API keys (the apiKey scheme applies)."""
        security = tuple(name for name in self.security if name != "apiKey" or api_keys)
        auth: dict[int, dict] = {}
        if "apiKey" in self.security:
            auth[429] = _error(429)  # per client address even without keys, when rate_limit_rps is set
        if security:
            auth[401] = _error(401)
        if "adminToken" in security:
            auth[403] = _error(403)
        doc: dict = {
            "operationId": self.operation_id, "summary": self.summary, "tags": list(self.tags),
            "responses": {str(status): response for status, response in sorted({500: _error(500), **auth,
                                                                                  **self.responses}.items())},
        }
        if self.parameters:
            doc["parameters"] = list(self.parameters)
        if self.request_body is not None:
            doc["requestBody"] = self.request_body
        if security:
            doc["security"] = [{name: []} for name in security]
        return doc


def _model_routes(suffix: str, op: str, summary: str, responses: dict[int, dict], *, method: str = "GET",
                  headers: tuple[dict, ...] = (), **kwargs) -> list[Operation]:
    """The same operation on /v2/models/{model}<suffix> and on .../versions/{version}<suffix>."""
    return [
        Operation(method, f"/v2/models/{{model}}{suffix}", op, summary, responses, parameters=(_MODEL, *headers),
                  **kwargs),
        Operation(method, f"/v2/models/{{model}}/versions/{{version}}{suffix}", f"{op}_version",
                  f"{summary} (one version)", responses, parameters=(_MODEL, _VERSION, *headers), **kwargs),
    ]


OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/v2", "server_metadata", "Server metadata", {200: _ok("ServerMetadata")}),
    Operation("GET", "/v2/", "server_metadata_slash", "Server metadata (the path as the OIP's OpenAPI document "
              "writes it)", {200: _ok("ServerMetadata")}),
    Operation("GET", "/v2/health/live", "server_live", "The server is up", {200: _ok("ServerLive", "live")},
              tags=("health",)),
    Operation("GET", "/v2/health/ready", "server_ready", "Every model is ready", _ready("ServerReady"),
              tags=("health",)),
    Operation("GET", "/-/healthz", "healthz", "Every model is ready, as KubeRay's readiness probe asks",
              {200: {"description": "ready", "content": {"text/plain": {"schema": {"type": "string", "enum": ["success"]}}}},
               503: _error(503)},
              tags=("health",)),
    Operation("GET", "/v2/models/stats", "all_model_stats", "Statistics of every model", {200: _ok("ModelStatistics")},
              security=_KEY),
    Operation("POST", "/v2/repository/index", "repository_index", "The models and versions served, with their state",
              {200: _ok("RepositoryIndex")},
              request_body={"required": False, "content": {"application/json": {"schema": {
                  "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}, security=_KEY),
    *_model_routes("", "model_metadata", "Model metadata", {200: _ok("ModelMetadata"), 404: _error(404)},
                   security=_KEY),
    *_model_routes("/ready", "model_ready", "The model (version) is ready",
                   {**_ready("ModelReady"), 404: _error(404, "invalid model name")}, tags=("health",)),
    Operation("GET", "/v2/models/{model}/config", "model_config", "Model configuration",
              {200: _ok("ModelConfig"), 404: _error(404)}, parameters=(_MODEL,), security=_KEY),
    *_model_routes("/stats", "model_stats", "Model statistics", {200: _ok("ModelStatistics"), 404: _error(404)},
                   security=_KEY),
    *_model_routes("/features", "model_features", "Live feature histograms against the reference bins",
                   {200: _ok("ModelFeatures"), 400: _error(400, "the model keeps no feature statistics"),
                    404: _error(404), 503: _error(503, "the model is not ready")}, security=_KEY),
    Operation("POST", "/v2/models/{model}/feedback", "model_feedback",
              "True labels of logged predictions, by request id (written before the answer)",
              {200: _ok("FeedbackResponse"), 400: _error(400, "a label of the wrong type, shape or value, or a "
                                                          "malformed body"), 404: _error(404), 413: _error(413),
               503: _error(503, "the server keeps no data (no data_dir)")},
              parameters=(_MODEL,), request_body={"required": True, "content": {
                  "application/json": {"schema": _ref("FeedbackRequest")}}}, security=_KEY, tags=("monitoring",)),
    *_model_routes("/drift", "model_drift", "Drift of the live inputs and scores against the version's reference",
                   {200: _ok("DriftReport"), 404: _error(404), 503: _error(503, "the monitor is not reachable")},
                   security=_KEY, tags=("monitoring",)),
    *_model_routes("/quality", "model_quality", "Online quality from labelled predictions",
                   {200: _ok("QualityReport"), 404: _error(404), 503: _error(503, "the monitor is not reachable")},
                   security=_KEY, tags=("monitoring",)),
    *_model_routes("/infer", "model_infer", "Inference (KServe v2 JSON or the binary tensor extension)",
                   {200: _INFER_OK, **{s: _error(s) for s in (400, 404, 413, 503, 504)}},
                   method="POST", headers=_INFER_HEADERS, request_body=_INFER_BODY, security=_KEY),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics, cluster-wide",
              {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
               503: _error(503, "metrics are not available on this replica")}, tags=("metrics",), security=_KEY),
    # Admin (serving/admin.py): Triton's repository extension, and fleet's version pin.
    Operation("POST", "/v2/repository/models/{model}/load", "repository_model_load",
              "Serve an unloaded model again, on every replica within version_poll_interval_s",
              {200: _ok("AdminState"), 400: _error(400, "parameters given: models come only from the repository"),
               404: _error(404)}, parameters=(_MODEL,), request_body=_REPOSITORY_BODY, security=_ADMIN,
              tags=("admin",)),
    Operation("POST", "/v2/repository/models/{model}/unload", "repository_model_unload",
              "Stop serving a model (inference and its ready answer 503) until it is loaded again; kept across "
              "restarts", {200: _ok("AdminState"), 400: _error(400), 404: _error(404)}, parameters=(_MODEL,),
              request_body=_REPOSITORY_BODY, security=_ADMIN, tags=("admin",)),
    Operation("POST", "/v2/admin/models/{model}/versions", "admin_model_versions",
              "Pin the served versions, or follow the config's version_policy again (null); kept across restarts",
              {200: _ok("AdminState"), 400: _error(400, "a version that is not published or was rejected, or a "
                                                  "malformed body"), 404: _error(404)},
              parameters=(_MODEL,), request_body={"required": True, "content": {"application/json": {
                  "schema": _ref("VersionsRequest")}}}, security=_ADMIN, tags=("admin",)),
    Operation("GET", "/v2/models/{model}/rollout", "model_rollout",
              "The model's rollout: stable and candidate versions, stage, weights, the gates' evidence, history",
              {200: _ok("RolloutState"), 404: _error(404, "unknown model, or one that does not roll out "
                                                          "progressively"),
               503: _error(503, "the controller is not reachable")}, parameters=(_MODEL,), security=_ADMIN,
              tags=("rollout",)),
    *(Operation("POST", f"/v2/models/{{model}}/rollout/{action}", f"model_rollout_{action}", summary,
                {200: _ok("RolloutState"), 400: _error(400, "no rollout to act on, a version that cannot be rolled "
                                                       "out, or a malformed body"), 404: _error(404)},
                parameters=(_MODEL,), request_body={"required": False, "content": {"application/json": {
                    "schema": _ref("RolloutRequest")}}}, security=_ADMIN, tags=("rollout",))
      for action, summary in (
          ("start", "Roll a version out (default: the newest accepted one) from the first stage"),
          ("pause", "Hold the rollout at its stage (a failing gate still rolls it back)"),
          ("resume", "Let a paused rollout's stages advance again"),
          ("promote", "Make the candidate the stable version now"),
          ("abort", "Take the candidate out of traffic now; it is not served again by the automation"))),
    Operation("GET", "/openapi.json", "openapi", "This document",
              {200: {"description": "OpenAPI 3 document", "content": {"application/json": {"schema": {
                  "type": "object"}}}}}, tags=("meta",)),
)


@dataclass
class _Document:
    paths: dict[str, dict] = field(default_factory=dict)

    def add(self, op: Operation, api_keys: bool = False) -> None:
        methods = self.paths.setdefault(op.path, {})
        if op.method.lower() in methods:
            raise ValueError(f"{op.method} {op.path} is in OPERATIONS twice")
        methods[op.method.lower()] = op.document(api_keys)


def openapi_document(version: str, operations: tuple[Operation, ...] = OPERATIONS, *,
                     api_keys: bool = False) -> dict:
    """The OpenAPI 3.0 document of fleet's HTTP API, server `version` in its info.

    `api_keys`: the server asks for API keys, so the inference routes carry the apiKey scheme and their 401.
    """
    doc = _Document()
    for op in operations:
        doc.add(op, api_keys)
    components: dict = {"schemas": SCHEMAS}
    if SECURITY_SCHEMES:
        components["securitySchemes"] = SECURITY_SCHEMES
    return {
        "openapi": "3.0.3",
        "info": {"title": "fleet", "version": version,
                 "description": "KServe v2 / Open Inference Protocol REST with Triton's extensions"},
        "paths": doc.paths,
        "components": components,
    }
