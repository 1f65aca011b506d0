"""One TorchScript model answering KServe v2 infer bodies one request at a time, with fleet's codec.

What every baseline server runs per request: decode (serving.protocol),
validate (serving.validation), one forward pass, encode. No batching, no queue,
no Ray: so a baseline accepts exactly fleet's request bodies and gives the same
answers, and what differs from fleet is only the serving machinery around it.
"""

from __future__ import annotations

import logging
import re
import uuid
import warnings
from collections.abc import Mapping

import numpy as np
import orjson
import torch

from serving.backends.base import positional_order
from serving.errors import BackendError, FleetError, ModelNotFound
from serving.model_config import ModelSpec
from serving.protocol import decode_request, encode_response
from serving.registry import ModelRepository
from serving.service import parse_header_length
from serving.validation import validate_request

__all__ = ["HEADER_LENGTH", "V2Model", "error_json", "load_torchscript", "match_infer_path", "not_found"]

_log = logging.getLogger("fleet.baselines")

_JSON = {"content-type": "application/json"}
_BINARY = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"
_INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")

# Binary tensors are zero-copy, read-only views of the body; the model never writes its inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def load_torchscript(
    repository: str, model: str, *, version: int | None = None
) -> tuple[ModelSpec, int, torch.jit.ScriptModule]:
    """(spec, version, module in eval mode on the CPU) for the newest served version, or `version`."""
    repo = ModelRepository(repository)
    spec = repo.spec(model)
    served = repo.served_versions(model, spec)
    if version is None:
        if not served:
            raise ModelNotFound(f"model {model!r} has no published version in {repo.root_uri}")
        version = served[-1]
    module = torch.jit.load(repo.model_file(model, version, spec), map_location="cpu")
    return spec, int(version), module.eval()


def match_infer_path(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) for `/v2/models/{m}[/versions/{v}]/infer`, else None."""
    found = _INFER_PATH.match(path)
    return None if found is None else (found["model"], found["version"])


def error_json(exc: BaseException) -> tuple[int, bytes]:
    """(HTTP status, `{"error": ...}` body): the one place a baseline turns an exception into an answer."""
    if isinstance(exc, FleetError):
        return exc.status, orjson.dumps({"error": exc.message})
    request_id = uuid.uuid4().hex
    _log.error("unexpected error (request id %s)", request_id, exc_info=exc)
    return 500, orjson.dumps({"error": f"internal error; request id {request_id}"})


class V2Model:
    """The model of one baseline server: v2 body in, v2 body out, on the calling thread."""

    def __init__(self, repository: str, model: str, *, threads: int = 1, warm_up_calls: int = 3) -> None:
        torch.set_num_threads(threads)
        self.spec, self.version, self.module = load_torchscript(repository, model)
        self.name = model
        self._tag = str(self.version)
        self._inputs = positional_order(self.spec.inputs)
        self._outputs = positional_order(self.spec.outputs)
        # The first calls of a TorchScript module profile and optimise the graph: not on a user's request.
        for rows in sorted({1, max(1, self.spec.max_batch_size)}):
            example = {t.name: np.zeros(self._shape(t.dims, rows), dtype=t.dtype) for t in self._inputs}
            for _ in range(warm_up_calls):
                self.run(example)

    def _shape(self, dims: tuple[int, ...], rows: int) -> tuple[int, ...]:
        batch = (rows,) if self.spec.max_batch_size > 0 else ()
        return batch + tuple(1 if d == -1 else d for d in dims)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass: arrays keyed by input name in, arrays keyed by output name out."""
        args = [torch.from_numpy(inputs[t.name]) for t in self._inputs]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            tensors = [result.get(t.name) for t in self._outputs]
        else:
            tensors = list(result)
        if len(tensors) != len(self._outputs) or not all(isinstance(x, torch.Tensor) for x in tensors):
            raise BackendError(
                f"model {self.name!r} returned {len(tensors)} tensors; its config declares "
                f"{[t.name for t in self._outputs]}"
            )
        return {t.name: x.numpy().astype(t.dtype, copy=False) for t, x in zip(self._outputs, tensors)}

    def infer(self, model: str, version: str | None, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        """Decode, validate, run, encode one request; (body, JSON header length or None).

        Raises ModelNotFound for another model or version, InvalidInput for a bad body.
        """
        if model != self.name:
            raise ModelNotFound(f"unknown model {model!r}; this server has {self.name!r}")
        if version is not None and version != self._tag:
            raise ModelNotFound(f"model {model!r} has no version {version!r}; this server has {self._tag}")
        request = decode_request(body, header_length)
        checked = validate_request(request, self.spec)
        result = self.run(checked.inputs)
        outputs = [(o.name, o.datatype, result[o.name], binary) for o, binary in checked.outputs]
        return encode_response(self.name, self._tag, outputs, request_id=request.id)

    def answer(
        self, model: str, version: str | None, body: bytes, header_length: str | None
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of the HTTP answer to one infer request; never raises.

        `header_length` is the raw Inference-Header-Content-Length header value.
        """
        try:
            payload, json_size = self.infer(model, version, body, parse_header_length(header_length))
        except Exception as exc:  # noqa: BLE001 - every error leaves through error_json
            status, doc = error_json(exc)
            return status, doc, _JSON
        if json_size is None:
            return 200, payload, _JSON
        return 200, payload, {"content-type": _BINARY, HEADER_LENGTH: str(json_size)}


def not_found(method: str, path: str) -> tuple[int, bytes, dict[str, str]]:
    """The answer to a path no baseline serves."""
    return 404, orjson.dumps({"error": f"no route {method} {path}; infer at /v2/models/{{model}}/infer"}), _JSON
