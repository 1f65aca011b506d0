"""An administrator's say over a model: `<model>/serving.json` in the repository (serving/registry.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from serving.errors import RepositoryError
from serving.model_config import ModelSpec

__all__ = ["ServingState"]


@dataclass(frozen=True)
class ServingState:
    """An administrator's say over a model, kept in `<model>/serving.json` (absent: the defaults).

    `loaded=False`: unloaded, nothing served until loaded again. `versions`: the pinned
    served set, in place of the config's version_policy (None: follow the policy).
    """

    loaded: bool = True
    versions: tuple[int, ...] | None = None

    def select(self, spec: ModelSpec, accepted: Sequence[int], rollout=None) -> list[int]:
        """The versions to serve out of `accepted` (ascending).

        `rollout`: the model's `serving.rollout.state.RolloutState` when it rolls out
        progressively: its stable version (and candidate, during a rollout) are served
        instead of the policy's newest, and its rolled-back versions never are.
        """
        if not self.loaded:
            return []
        if self.versions is not None:
            return sorted(set(self.versions) & set(accepted))
        if rollout is not None:
            served = [v for v in rollout.served() if v in accepted]
            if served:
                return served
            accepted = [v for v in accepted if v not in rollout.rolled_back]  # its stable was deleted
        return spec.version_policy.select(list(accepted))

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "versions": None if self.versions is None else list(self.versions)}

    @classmethod
    def from_dict(cls, doc: Mapping, source: str) -> "ServingState":
        loaded, versions = doc.get("loaded", True), doc.get("versions")
        ok = isinstance(loaded, bool) and (versions is None or (
            isinstance(versions, list) and all(type(v) is int and v >= 1 for v in versions)))
        if not ok:
            raise RepositoryError(f"{source}: 'loaded' must be true/false and 'versions' null or a list of "
                                  f"positive integers, got {dict(doc)!r}")
        return cls(loaded, None if versions is None else tuple(sorted(set(versions))))
