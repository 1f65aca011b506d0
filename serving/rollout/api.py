"""The rollout admin routes' logic: `GET /v2/models/{m}/rollout`, `POST /v2/models/{m}/rollout/{action}`.

Both need the admin token (serving/auth.py). The controller (in the monitor actor) owns the
state; the replica that took the call applies the new route at once, the others with their
next statistics push. Each action is also an audit line of the "fleet.audit" logger
(serving/admin.py) with the client's address, never a credential.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.admin import _audit, _who
from serving.errors import InvalidInput
from serving.registry import check_model_name
from serving.rollout.controller import ACTIONS
from serving.rollout.state import Route

__all__ = ["RolloutRequest", "rollout_status", "rollout_action"]


class RolloutRequest(BaseModel):
    """`POST .../rollout/start` may name the version (default: the newest accepted one), the mode (default the
    model's `fleet.rollout`; `ab`: an A/B experiment at a fixed `split`); other actions take `{}`."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, Field(strict=True, ge=1)] | None = None
    mode: Literal["canary", "shadow", "ab"] | None = None
    split: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None


async def rollout_status(service, model: str) -> dict:
    check_model_name(model)
    service._model(model)
    return await service.rollout_call(model, None)


async def rollout_action(service, model: str, action: str, request: RolloutRequest, client=None) -> dict:
    check_model_name(model)
    service._model(model)
    if action not in ACTIONS:
        raise InvalidInput(f"unknown rollout action {action!r}; use one of {list(ACTIONS)}")
    if action != "start" and request.model_fields_set:
        raise InvalidInput(f"only 'start' takes a version, mode or split; {action!r} acts on the rollout in progress")
    if (request.mode == "ab") != (request.split is not None):
        raise InvalidInput("an A/B experiment ('mode': 'ab') needs a 'split' (the candidate's share, in (0, 1)), "
                           "and only an A/B experiment takes one")
    doc = await service.rollout_call(model, action, request.version, f"admin {_who(client)}",
                                     mode=request.mode, split=request.split)
    _audit.info("admin rollout %s model=%s version=%s -> status=%s stable=%s candidate=%s client=%s", action, model,
                request.version, doc.get("status"), doc.get("stable"), doc.get("candidate"), _who(client))
    service.apply_route(model, Route.from_dict(doc))
    return doc
