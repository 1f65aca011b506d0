"""A model's fallback and its backend's circuit breaker, from its config's parameters.

    parameters { key: "fleet.fallback"                value { string_value: "fraud" } }   # or "fraud:2"
    parameters { key: "fleet.breaker.failures"        value { string_value: "5" } }       # batches in a row
    parameters { key: "fleet.breaker.cooldown_ms"     value { string_value: "1000" } }    # before the 1st probe
    parameters { key: "fleet.breaker.max_cooldown_ms" value { string_value: "30000" } }   # doubled up to this

When the model's backend cannot answer (a Triton server down: ModelUnavailable or
BackendError), its requests are answered by the fallback — another served model
with the same inputs and outputs — and each answer says so in a `fleet-fallback:
<model>/<version>` header. The breaker (serving/breaker.py) stops sending batches
to the failing backend and probes it back. The fallback is checked when the
application is built and when an ingress replica starts: a name that is not
served, or tensors that differ, is a RepositoryError saying which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from serving.breaker import BreakerConfig
from serving.errors import RepositoryError
from serving.model_config import (
    BREAKER_COOLDOWN_PARAM, BREAKER_FAILURES_PARAM, BREAKER_MAX_COOLDOWN_PARAM, FALLBACK_PARAM, ModelSpec, is_decimal,
)

__all__ = ["Fallback", "FALLBACK_HEADER", "fallback_of", "check_fallbacks", "breaker_config", "wants_breaker"]

FALLBACK_HEADER = "fleet-fallback"


@dataclass(frozen=True)
class Fallback:
    """The model (and version; None: its newest served one) that answers for a model whose backend is down."""

    model: str
    version: int | None = None


def fallback_of(spec: ModelSpec, specs: Mapping[str, ModelSpec]) -> Fallback | None:
    """The model's fallback, checked against the served models' specs; None when it names none."""
    raw = spec.parameters.get(FALLBACK_PARAM, "").strip()
    if not raw:
        return None
    where = f"model {spec.name!r}: parameter {FALLBACK_PARAM!r}"
    name, _, version = raw.partition(":")
    if version and not is_decimal(version):
        raise RepositoryError(f"{where} must be '<model>' or '<model>:<version>', got {raw!r}")
    if name == spec.name:
        raise RepositoryError(f"{where} names the model itself; name another served model")
    other = specs.get(name)
    if other is None:
        raise RepositoryError(f"{where} names {name!r}, which is not served; served models: {sorted(specs)}")
    for kind in ("inputs", "outputs"):
        mine = {(t.name, t.datatype, t.dims) for t in getattr(spec, kind)}
        theirs = {(t.name, t.datatype, t.dims) for t in getattr(other, kind)}
        if mine != theirs:
            raise RepositoryError(f"{where}: {name!r} has other {kind} ({sorted(theirs)}) than "
                                  f"{spec.name!r} ({sorted(mine)}); a fallback must take and return the same tensors")
    if spec.max_batch_size and other.max_batch_size < spec.max_batch_size:
        raise RepositoryError(f"{where}: {name!r} takes batches of up to {other.max_batch_size} rows, "
                              f"fewer than {spec.name!r}'s {spec.max_batch_size}")
    return Fallback(name, int(version) if version else None)


def check_fallbacks(specs: Mapping[str, ModelSpec]) -> dict[str, Fallback]:
    """Every served model's fallback, checked; raises RepositoryError for the first bad one."""
    out = {}
    for spec in specs.values():
        fallback = fallback_of(spec, specs)
        if fallback is not None:
            out[spec.name] = fallback
    return out


def wants_breaker(spec: ModelSpec) -> bool:
    """A breaker guards remote backends (Triton) and any model with a fallback to send batches to."""
    return spec.backend == "triton" or bool(spec.parameters.get(FALLBACK_PARAM))


def breaker_config(spec: ModelSpec) -> BreakerConfig:
    """The breaker's settings from the config's parameters (checked numbers; see `serving.model_config`)."""
    p = spec.parameters
    default = BreakerConfig()
    cooldown_s = float(p.get(BREAKER_COOLDOWN_PARAM, default.cooldown_s * 1000)) / 1000
    max_cooldown_s = max(cooldown_s, float(p.get(BREAKER_MAX_COOLDOWN_PARAM, default.max_cooldown_s * 1000)) / 1000)
    return BreakerConfig(failures=int(p.get(BREAKER_FAILURES_PARAM, default.failures)),
                         cooldown_s=cooldown_s, max_cooldown_s=max_cooldown_s)
