"""The Open Inference Protocol's own documents (tests/data/open-inference-protocol/), read for the tests.

- `rest_validator(method, path, status)`: the schema `open_inference_rest.yaml` gives the answer of a
  request, as an OpenAPI 3.0 validator (None where the document gives no body);
- `prose_schemas()`: the JSON bodies `inference_rest.md` defines (`$ready_model_response = {...}`),
  as JSON schemas, for the answers the OpenAPI document leaves without a body (health);
- `proto_rpcs()`: the RPC names of `open_inference_grpc.proto`'s service.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import yaml
from openapi_schema_validator import OAS30Validator

__all__ = ["SPEC_DIR", "DATATYPES", "PLATFORMS", "rest_validator", "prose_schemas", "proto_rpcs", "proto_service"]

SPEC_DIR = Path(__file__).resolve().parents[1] / "data" / "open-inference-protocol"


@functools.cache
def _rest() -> dict:
    return yaml.safe_load((SPEC_DIR / "open_inference_rest.yaml").read_text())


def _prose() -> str:
    return (SPEC_DIR / "inference_rest.md").read_text()


def _section(title: str) -> str:
    return _prose().split(title, 1)[1].split("\n---\n", 1)[0]


DATATYPES = frozenset(re.findall(r"^\| ([A-Z0-9]+)\s+\|", _section("#### Tensor Data Types"), re.M))
PLATFORMS = frozenset(re.findall(r"^\* (\w+)\s*:", _section("#### Platforms"), re.M))  # "<project>_<format>"


def _path_pattern(template: str) -> re.Pattern:
    # `${MODEL_NAME}` is one path segment; the version part is optional, as the prose's
    # `v2/models/<model_name>[/versions/<model_version>]/...` says; `/v2/` is also `/v2`.
    pattern = "".join("/" + ("[^/]+" if part.startswith("${") else re.escape(part))
                      for part in template.strip("/").split("/"))
    return re.compile(pattern.replace("/versions/[^/]+", "(?:/versions/[^/]+)?") + "/?")


def rest_validator(method: str, path: str, status: int) -> OAS30Validator | None:
    """The validator of the answer's JSON body per open_inference_rest.yaml, None where it defines none.

    An error status the document does not list takes its 400's body: the prose defines one error
    object per route, sent with "an HTTP error status (typically 400)".
    """
    doc = _rest()
    for template, item in doc["paths"].items():
        if _path_pattern(template).fullmatch(path) and method.lower() in item:
            responses = item[method.lower()]["responses"]
            response = responses.get(str(status)) or (responses.get("400") if status >= 400 else None)
            schema = (response or {}).get("content", {}).get("application/json", {}).get("schema")
            return None if schema is None else OAS30Validator({**schema, "components": doc["components"]})
    raise LookupError(f"{method} {path} is not a route of open_inference_rest.yaml")


_BLOCK = re.compile(r"^ {4}\$(\w+) =\n {4}\{\n(.*?)\n {4}\}", re.M | re.S)
_FIELD = re.compile(r'"(\w+)"\s*:\s*(.+?)\s*(#optional)?\s*,?\s*$')
_SCALARS = {
    "string": {"type": "string"}, "bool": {"type": "boolean"}, "number": {"type": "number"},
    # `$parameter = $string : $string | $number | $boolean`, under the $parameters block
    "parameters": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
}


@functools.cache
def prose_schemas() -> dict[str, dict]:
    """Every `$name = { "field" : $type [#optional], ... }` body of inference_rest.md as a JSON schema.

    Fields are required unless `#optional`; a type the prose defines only in words (`$tensor_data`)
    is left open: the OpenAPI document's schema checks it.
    """
    blocks = dict(_BLOCK.findall(_prose()))

    def type_of(expr: str) -> dict:
        expr = expr.strip().rstrip(",").strip()
        if expr.startswith("["):
            return {"type": "array", "items": type_of(expr.strip("[] ").split(",")[0])}
        if expr.startswith("<"):  # `<error message string>`
            return {"type": "string"}
        name = expr.lstrip("$")
        if name in _SCALARS:
            return _SCALARS[name]
        return schema(name) if name in blocks else {}

    def schema(name: str) -> dict:
        properties, required = {}, []
        for line in blocks[name].splitlines():
            match = _FIELD.search(line)
            if match is not None:
                field, expr, optional = match.groups()
                properties[field] = type_of(expr)
                if not optional:
                    required.append(field)
        return {"type": "object", "properties": properties, "required": required}

    return {name: schema(name) for name in blocks if name != "parameters"}


def _proto() -> str:
    return (SPEC_DIR / "open_inference_grpc.proto").read_text()


def proto_service() -> str:
    """The fully qualified service name, `<package>.<service>`."""
    text = _proto()
    package = re.search(r"^package (\w+);", text, re.M).group(1)
    return package + "." + re.search(r"^service (\w+)", text, re.M).group(1)


def proto_rpcs() -> list[str]:
    return re.findall(r"^\s*rpc (\w+)\(", _proto(), re.M)
