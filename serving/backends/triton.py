"""Triton backend: forward each batch to a Triton Inference Server with tritonclient.

Binary tensors both ways over pooled HTTP connections (tritonclient.http.aio),
to the server's own model name and version from the config's parameters:

    parameters { key: "fleet.triton.url"     value { string_value: "triton-host:8000" } }
    parameters { key: "fleet.triton.model"   value { string_value: "fraud" } }    # default: same name
    parameters { key: "fleet.triton.version" value { string_value: "1" } }        # default: Triton's choice

A Triton that is down when the replica starts does not stop it: `load()` waits
a few seconds for it, then returns; `health()` says the model is not ready
(what the replica's status reports) until the server answers, and batches meet
ModelUnavailable meanwhile (the ingress's circuit breaker and fallback take them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping

import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from serving.errors import BackendError, ModelUnavailable
from serving.model_config import TRITON_MODEL_PARAM, TRITON_VERSION_PARAM, ModelSpec
from serving.preprocess import model_inputs

__all__ = ["TritonBackend"]

_CONNECTIONS = 32
_CHECK_TIMEOUT_S = 2.0  # a readiness question that takes longer fails
_FAILED_CHECKS_TO_DOWN = 2  # a ready model reads down after this many failed checks in a row
_HEALTH_MAX_AGE_S = 1.0  # the replica's status is asked by every ingress replica: one check per second serves all

_log = logging.getLogger("fleet.backends.triton")


def _host_port(url: str) -> str:
    # tritonclient wants "host:port"; accept a URL with a scheme too.
    for prefix in ("http://", "https://"):
        if url.startswith(prefix):
            return url[len(prefix):].rstrip("/")
    return url.rstrip("/")


class TritonBackend:
    """Forwards batches for one fleet model version to a Triton server."""

    device = "triton"

    def __init__(self, spec: ModelSpec, version: int, *, connect_timeout_s: float = 2.0):
        self.spec = spec
        self.version = version
        self.url = _host_port(spec.triton_url or "")
        self.remote_model = spec.parameters.get(TRITON_MODEL_PARAM) or spec.name
        self.remote_version = spec.parameters.get(TRITON_VERSION_PARAM, "")
        self._connect_timeout_s = connect_timeout_s
        self._client: aioclient.InferenceServerClient | None = None
        self._outputs = [httpclient.InferRequestedOutput(t.name, binary_data=True) for t in spec.outputs]
        self._health: tuple[float, str | None] = (-float("inf"), "not checked yet")  # (when, error or None)
        self._failed_checks = 0  # in a row

    async def load(self) -> None:
        """Connect and wait (up to the connect timeout) until Triton says the model is ready.

        A server still down then is not an error: the replica starts, and `health()`
        reports the model not ready until Triton answers.
        """
        self._client = aioclient.InferenceServerClient(self.url, conn_limit=_CONNECTIONS)
        deadline = time.monotonic() + self._connect_timeout_s
        while time.monotonic() < deadline:
            if await self.health(max_age_s=0) is None:
                return
            await asyncio.sleep(0.5)
        _log.warning("model %s version %s: %s; serving it as not ready until Triton answers",
                     self.spec.name, self.version, self._health[1])

    async def health(self, max_age_s: float = _HEALTH_MAX_AGE_S) -> str | None:
        """None when Triton has the model ready, else why not; asked at most once per `max_age_s`."""
        checked, error = self._health
        if time.monotonic() - checked < max_age_s:
            return error
        error = None
        try:
            ready = await asyncio.wait_for(
                self._client.is_model_ready(self.remote_model, self.remote_version), _CHECK_TIMEOUT_S)
            if not ready:
                error = "not ready"
        except Exception as exc:  # connection refused while Triton starts or after it went away
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if error is not None:
            error = (f"Triton at {self.url} has no ready model {self.remote_model!r} "
                     f"(version {self.remote_version or 'default'}): {error}")
        self._failed_checks = self._failed_checks + 1 if error is not None else 0
        if error is not None and self._failed_checks < _FAILED_CHECKS_TO_DOWN and checked > -float("inf") \
                and self._health[1] is None:
            # One slow answer (a busy event loop or machine) does not make a serving model unready:
            # it takes two failed checks in a row, a second or so apart.
            self._health = (time.monotonic(), None)
            return None
        self._health = (time.monotonic(), error)
        return error

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._client is None:
            raise ModelUnavailable(f"model {self.spec.name!r}: not connected to Triton")
        request = []
        for t in model_inputs(self.spec):  # after any preprocessing the ingress did
            arr = inputs.get(t.name)
            if arr is None:
                continue
            tensor = httpclient.InferInput(t.name, list(arr.shape), t.datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(arr), binary_data=True)
            request.append(tensor)
        try:
            result = await self._client.infer(
                self.remote_model, request, model_version=self.remote_version, outputs=self._outputs
            )
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if status in ("503", "StatusCode.UNAVAILABLE"):
                raise ModelUnavailable(f"Triton at {self.url} is unavailable: {exc.message()}") from exc
            raise BackendError(f"Triton at {self.url} failed the batch: {exc.message()}") from exc
        except Exception as exc:  # connection refused/reset: the server is gone
            raise ModelUnavailable(f"Triton at {self.url} is unreachable: {exc}") from exc
        return {t.name: result.as_numpy(t.name) for t in self.spec.outputs}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def describe(self) -> dict:
        return {"backend": "triton", "url": self.url, "remote_model": self.remote_model,
                "remote_version": self.remote_version or None}
