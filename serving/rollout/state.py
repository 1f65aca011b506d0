"""A model's rollout state, `<repo>/<model>/rollout.json`: one writer (the controller), every replica reads it.

```
{"model": "fraud", "stable": 3, "candidate": 4, "status": "canary", "mode": "canary",
 "stage": 1, "stages": [1, 5, 20, 50, 100], "weight": 0.05, "shadow_share": 0.0,
 "rollout_id": "4-1765000000", "started_at": ..., "stage_started_at": ..., "epoch": 17,
 "rolled_back": [2], "evidence": {...the judge's latest verdict...}, "judge": {...its state...},
 "alarm": null, "history": [{"at": ..., "event": "stage", ...}, ...], "updated_at": ...}
```

`status`: `idle` (the stable version takes all traffic), `canary` (the candidate takes `weight`
of it), `shadow` (the candidate gets copies of `shadow_share` of it, answers nobody), `paused`
(a canary whose stage an administrator froze; a failing gate still rolls it back), `ab` (an
A/B experiment an administrator started: the candidate takes a fixed `weight`, nothing is
decided automatically, a sample-ratio mismatch raises the alarm). `epoch`
grows with every write, so a replica applies a state only if it is newer than the one it has.
A version in `rolled_back` is never served again by the automation (an administrator may
start it explicitly). Written write-temp-then-rename (`ModelRepository.write_state_file`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from serving.errors import RepositoryError

__all__ = ["RolloutState", "Route", "ROLLOUT_FILE", "STATUSES", "read_rollout", "write_rollout", "MAX_HISTORY"]

ROLLOUT_FILE = "rollout.json"
STATUSES = ("idle", "canary", "shadow", "paused", "ab")
MAX_HISTORY = 200  # events kept in the file; every one is also in the audit log


@dataclass(frozen=True)
class Route:
    """What an ingress replica needs to route one model's requests (a view of RolloutState)."""

    stable: int | None
    candidate: int | None = None
    weight: float = 0.0  # share of routing keys answered by the candidate
    shadow_share: float = 0.0  # share of requests also copied to the candidate
    epoch: int = 0

    @property
    def active(self) -> bool:
        return self.candidate is not None and (self.weight > 0.0 or self.shadow_share > 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping) -> "Route":
        return cls(doc.get("stable"), doc.get("candidate"), float(doc.get("weight", 0.0)),
                   float(doc.get("shadow_share", 0.0)), int(doc.get("epoch", 0)))


@dataclass(frozen=True)
class RolloutState:
    model: str
    stable: int | None = None
    candidate: int | None = None
    status: str = "idle"
    mode: str = "canary"
    stage: int = 0
    stages: tuple[float, ...] = (1.0, 5.0, 20.0, 50.0, 100.0)
    weight: float = 0.0
    shadow_share: float = 0.0
    rollout_id: str | None = None
    started_at: float | None = None
    stage_started_at: float | None = None
    epoch: int = 0
    rolled_back: tuple[int, ...] = ()
    evidence: dict = field(default_factory=dict)
    judge: dict = field(default_factory=dict)
    alarm: str | None = None
    history: tuple[dict, ...] = ()
    updated_at: float | None = None

    @property
    def route(self) -> Route:
        if self.status == "idle" or self.candidate is None:
            return Route(self.stable, None, 0.0, 0.0, self.epoch)
        return Route(self.stable, self.candidate, self.weight, self.shadow_share, self.epoch)

    def served(self) -> list[int]:
        """The versions replicas keep loaded for this state, ascending."""
        versions = {v for v in (self.stable,) if v is not None}
        if self.status != "idle" and self.candidate is not None:
            versions.add(self.candidate)
        return sorted(versions)

    def evolve(self, event: dict | None = None, now: float | None = None, **changes) -> "RolloutState":
        """A copy with `changes`, the epoch moved on and `event` (if any) appended to the history."""
        now = time.time() if now is None else now
        history = self.history
        if event is not None:
            history = (*history, {"at": now, **event})[-MAX_HISTORY:]
        return replace(self, **changes, history=history, epoch=self.epoch + 1, updated_at=now)

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["stages"] = list(self.stages)
        doc["rolled_back"] = list(self.rolled_back)
        doc["history"] = list(self.history)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping, source: str = ROLLOUT_FILE) -> "RolloutState":
        if not isinstance(doc, Mapping) or not isinstance(doc.get("model"), str):
            raise RepositoryError(f"{source}: expected a JSON object with a 'model', got {type(doc).__name__}")
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        try:
            state = cls(**{**known, "stages": tuple(float(s) for s in known.get("stages", cls.stages)),
                           "rolled_back": tuple(int(v) for v in known.get("rolled_back", ())),
                           "history": tuple(known.get("history", ()))})
        except (TypeError, ValueError) as exc:
            raise RepositoryError(f"{source}: {exc}") from exc
        versions_ok = all(v is None or (type(v) is int and v >= 1) for v in (state.stable, state.candidate))
        if state.status not in STATUSES or not versions_ok or not 0.0 <= state.weight <= 1.0:
            raise RepositoryError(f"{source}: status must be one of {list(STATUSES)}, versions positive integers "
                                  f"and weight in [0, 1]; got status={state.status!r} stable={state.stable!r} "
                                  f"candidate={state.candidate!r} weight={state.weight!r}")
        return state


def read_rollout(repository, model: str) -> RolloutState | None:
    """The model's rollout.json, None when it has none; RepositoryError when it cannot be read."""
    raw = repository.read_state_file(model, ROLLOUT_FILE)
    if raw is None:
        return None
    source = f"{model}/{ROLLOUT_FILE}"
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise RepositoryError(f"{source}: {exc}") from exc
    return RolloutState.from_dict(doc, source)


def write_rollout(repository, state: RolloutState) -> None:
    """Replace the model's rollout.json atomically (the controller is its only writer)."""
    data = json.dumps(state.to_dict(), indent=1, allow_nan=False).encode()
    repository.write_state_file(state.model, ROLLOUT_FILE, data)
