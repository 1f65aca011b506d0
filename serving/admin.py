"""Admin operations: unload a model, load it again, pin its served versions — cluster-wide and durable.

Each writes the model's `<repo>/<model>/serving.json` (`ModelRepository.write_serving_state`:
write-temp-then-rename), which every replica holding the model follows at its next
version poll (`version_poll_interval_s`, serving/versions.py) and a restarted cluster
starts from. The replica that took the call follows it at once (its colocated model,
or one replica of a split model's workers, syncs now) and answers with the new state.

Every call is logged to the "fleet.audit" logger with what changed (before -> after)
and the client's address; never a credential. Refused calls are logged too. The logger
writes to stderr by default — in a cluster, the ingress replica's worker log
(`<ray session>/logs/worker-*.err`, the dashboard's Logs view) — whatever level
Ray's logging is at; give it handlers of your own to send it elsewhere.

Request data is checked before it reaches a path: a model name is one path component
(`check_model_name`: no `/`, `..`, NUL, ...) and must be a model this cluster serves;
versions are positive integers. Bodies are JSON read by pydantic: nothing is
unpickled or evaluated, and model files and configs come only from the repository
(Triton's load parameters `config` and `file:...` are refused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import weakref
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from serving.errors import InvalidInput, ModelNotFound
from serving.registry import ModelRepository, ServingState, check_model_name
from serving.service import InferenceService

__all__ = ["VersionsRequest", "RepositoryRequest", "parse_request", "unload_model", "load_model", "pin_versions",
           "audit_denied", "AUDIT_LOGGER"]

AUDIT_LOGGER = "fleet.audit"


def _audit_logger() -> logging.Logger:
    """The audit logger (configured once, at import): at INFO, on stderr, not propagated.

    Ray runs replicas with logging at WARNING and no handler of ours; an audit line must
    not depend on that. Add handlers to it to send the lines elsewhere too.
    """
    audit = logging.getLogger(AUDIT_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False
    return audit


_audit = _audit_logger()
_log = logging.getLogger("fleet.admin")

_SYNC_TIMEOUT_S = 60.0  # this replica loading a newly pinned version; the answer says what serves by then
_locks: "weakref.WeakKeyDictionary[InferenceService, asyncio.Lock]" = weakref.WeakKeyDictionary()


class VersionsRequest(BaseModel):
    """`POST /v2/admin/models/{m}/versions`: `{"versions": [N, ...]}` pins, `{"versions": null}` unpins."""

    model_config = ConfigDict(extra="forbid")

    versions: list[Annotated[int, Field(strict=True, ge=1)]] | None = Field(..., min_length=1, max_length=1024)


class _UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unload_dependents: StrictBool = False  # Triton's; fleet has no ensembles, so nothing depends on a model


class _LoadParameters(BaseModel):
    # Triton's `config` / `file:<path>` overrides would load a model from the request: refused.
    model_config = ConfigDict(extra="forbid")


class RepositoryRequest(BaseModel):
    """Triton's load/unload body, `{"parameters": {...}}` (may be empty or absent)."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict = Field(default_factory=dict)


def parse_request(body: bytes, kind: type[BaseModel]) -> BaseModel:
    """`body` (JSON; empty: `{}`) as `kind`, or InvalidInput (400) saying what is wrong."""
    try:
        return kind.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid request body: {problems}") from None


def _check_parameters(request: RepositoryRequest, kind: type[BaseModel], action: str) -> None:
    try:
        kind.model_validate(request.parameters)
    except ValidationError as exc:
        names = sorted(str(e["loc"][0]) for e in exc.errors() if e["loc"])
        raise InvalidInput(f"{action} takes no parameters {names}: fleet serves models only from its repository"
                           + ("; unload_dependents must be true or false" if action == "unload" else "")) from None


def _who(client) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"


def _audit_line(action: str, model: str, before: ServingState, after: ServingState, client) -> None:
    _audit.info("admin %s model=%s %s -> %s client=%s", action, model, json.dumps(before.to_dict()),
                         json.dumps(after.to_dict()), _who(client))


def audit_denied(method: str, path: str, status: int, client) -> None:
    """A refused admin call (no or a wrong token, admin endpoints off), for the audit trail."""
    _audit.warning("admin call refused (%d) %s %r client=%s", status, method, path[:200], _who(client))


class _Admin:
    """One admin call against `service`'s model `model`."""

    def __init__(self, service: InferenceService, model: str):
        check_model_name(model)
        if model not in service.models:  # (a model new to the repository is served from the next `fleet up`)
            raise ModelNotFound(f"unknown model {model!r}; served models: {sorted(service.models)}")
        self.service = service
        self.model = model
        self.repository = ModelRepository(service.options.repository)

    async def change(self, action: str, update, client) -> dict:
        # Read-modify-write, one at a time in this replica (two replicas changing one model at the
        # same instant: the later write wins, both are in the audit log).
        async with _locks.setdefault(self.service, asyncio.Lock()):
            before = await asyncio.to_thread(self.repository.serving_state, self.model)
            after = update(before)
            await asyncio.to_thread(self.repository.write_serving_state, self.model, after)
        _audit_line(action, self.model, before, after, client)
        await self._apply()
        return self._answer(after)

    async def _apply(self) -> None:
        state = self.service.models[self.model]
        sync = getattr(state.worker, "sync", None)
        if sync is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sync()), _SYNC_TIMEOUT_S)  # a slow load goes on
            except Exception as exc:  # noqa: BLE001 - written: the replicas follow at their next poll
                _log.warning("model %s: this replica could not follow serving.json now: %s", self.model, exc)
        await self.service.refresh(models=(self.model,))

    def _answer(self, after: ServingState) -> dict:
        state = self.service.models[self.model]
        return {
            "model": self.model,
            **after.to_dict(),
            # what this replica serves now; the others within their poll interval
            "served_versions": [str(v) for v in state.versions],
            "ready": state.ready,
            "poll_interval_s": self.service.options.version_poll_interval_s,
        }


async def unload_model(service: InferenceService, model: str, request: RepositoryRequest, client=None) -> dict:
    """Stop serving `model` everywhere until it is loaded again (inference 503, model ready 503)."""
    admin = _Admin(service, model)
    _check_parameters(request, _UnloadParameters, "unload")
    return await admin.change("unload", lambda s: ServingState(False, s.versions), client)


async def load_model(service: InferenceService, model: str, request: RepositoryRequest, client=None) -> dict:
    """Serve `model` again (its pin, if any, still holds). Only models of this cluster's repository."""
    admin = _Admin(service, model)
    _check_parameters(request, _LoadParameters, "load")
    return await admin.change("load", lambda s: ServingState(True, s.versions), client)


async def pin_versions(service: InferenceService, model: str, request: VersionsRequest, client=None) -> dict:
    """Serve exactly `request.versions` (published, not rejected by the gate), or the version_policy again (None)."""
    admin = _Admin(service, model)
    versions = None
    if request.versions is not None:
        versions = tuple(sorted(set(request.versions)))
        repo, spec = admin.repository, service.models[model].spec
        published = await asyncio.to_thread(repo.list_versions, model, spec)
        accepted = await asyncio.to_thread(repo.accepted_versions, model, spec)
        missing = [v for v in versions if v not in published]
        if missing:
            raise InvalidInput(f"model {model!r} has no published version {', '.join(map(str, missing))}; "
                               f"published versions: {published}")
        rejected = [v for v in versions if v not in accepted]
        if rejected:
            raise InvalidInput(f"model {model!r} version {', '.join(map(str, rejected))} was rejected by the "
                               f"training gate and is never served; accepted versions: {accepted}")
    return await admin.change("pin versions" if versions else "unpin versions",
                              lambda s: ServingState(s.loaded, versions), client)
