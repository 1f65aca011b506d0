"""A model's rollout settings, from the `fleet.rollout*` parameters of its config.pbtxt.

- `fleet.rollout`: `canary` (default), `shadow` or `immediate` (a new version takes all the
  traffic as soon as it is published, fleet's behaviour before progressive delivery).
  Only a model whose version_policy serves one version (`latest: 1`, the default) rolls
  out; any other policy serves what it selects, as before.
- `fleet.rollout.stages`: the canary's traffic shares in percent, ascending, ending at 100
  (default `1,5,20,50,100`).
- `fleet.rollout.false_rollback_rate`: the judge's total false-rollback probability for one
  rollout, over all gates and however long it is watched (default 0.002).
- `fleet.rollout.accuracy_weight`: the accuracy gate's share of that rate against 1 for each other
  active gate (default 6: labelled pairs are scarce, every other gate sees every request).
- `fleet.rollout.min_stage_requests`: candidate requests a stage needs before it may pass (200).
- `fleet.rollout.min_stage_s`: and seconds (default 0).
- `fleet.rollout.max_stage_s`: a stage held this long for lack of evidence raises an alarm (900).
- `fleet.rollout.shadow_share`: in shadow mode, the share of requests copied to the candidate (1.0).
- `fleet.rollout.labels`: `true` when labels come back through feedback: the accuracy gate
  then needs `min_stage_labels` (200) labelled candidate predictions per stage.
- `fleet.rollout.latency_warmup_s`: the rollout's first seconds, not judged for latency (10): a
  version's first seconds of traffic run its cold paths.
- `fleet.rollout.baseline_requests`: stable's successes (and outputs) in the rollout that fix the
  latency thresholds and output groups the judge tests against (2000).
- `fleet.rollout.gates`: the gates that decide, comma-separated among errors, latency, outputs,
  accuracy. Default: `errors,latency,outputs` without labels; with `labels: true`,
  `errors,latency,accuracy`: when the truth comes back it is judged directly, and a retrained
  version, whose scores are meant to move, is not rolled back for moving them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from serving.errors import RepositoryError

__all__ = ["RolloutConfig", "MODES", "ROLLOUT_PARAM", "rollout_config"]

ROLLOUT_PARAM = "fleet.rollout"
MODES = ("canary", "shadow", "immediate")
_PREFIX = "fleet.rollout."


@dataclass(frozen=True)
class RolloutConfig:
    mode: str = "canary"
    stages: tuple[float, ...] = (1.0, 5.0, 20.0, 50.0, 100.0)  # percent of traffic on the candidate
    false_rollback_rate: float = 0.002
    accuracy_weight: float = 6.0
    min_stage_requests: int = 200
    min_stage_s: float = 0.0
    max_stage_s: float = 900.0
    shadow_share: float = 1.0
    labels: bool = False
    min_stage_labels: int = 200
    baseline_requests: int = 2000
    latency_warmup_s: float = 10.0
    gates: tuple[str, ...] = ()  # empty: the default for `labels` (see `decisive_gates`)

    @property
    def decisive_gates(self) -> tuple[str, ...]:
        if self.gates:
            return self.gates
        return ("errors", "latency", "accuracy") if self.labels else ("errors", "latency", "outputs")

    @property
    def progressive(self) -> bool:
        return self.mode != "immediate"

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": list(self.stages), "gates": list(self.decisive_gates)}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], source: str = "config.pbtxt") -> "RolloutConfig":
        """The settings, or a RepositoryError naming the parameter and what it accepts."""
        known = {f"{_PREFIX}{name}" for name in cls.__dataclass_fields__ if name != "mode"} | {ROLLOUT_PARAM}
        unknown = sorted(k for k in parameters if (k == ROLLOUT_PARAM or k.startswith(_PREFIX)) and k not in known)
        if unknown:
            raise RepositoryError(f"{source}: unknown rollout parameter(s) {unknown}; known: {sorted(known)}")

        def bad(name: str, what: str):
            return RepositoryError(f"{source}: parameter {name!r} must be {what}, got {parameters[name]!r}")

        def number(field: str, default, low: float, high: float, integer: bool = False, open_low: bool = False):
            name = _PREFIX + field
            if name not in parameters:
                return default
            try:
                value = int(parameters[name]) if integer else float(parameters[name])
            except ValueError:
                value = None
            if value is None or value != value or value > high or value < low or (open_low and value == low):
                kind = "an integer" if integer else "a number"
                raise bad(name, f"{kind} in {'(' if open_low else '['}{low}, {high}]")
            return value

        mode = parameters.get(ROLLOUT_PARAM, "canary").strip()
        if mode not in MODES:
            raise bad(ROLLOUT_PARAM, f"one of {list(MODES)}")
        stages = cls.stages
        name = _PREFIX + "stages"
        if name in parameters:
            try:
                stages = tuple(float(s) for s in parameters[name].split(","))
            except ValueError:
                raise bad(name, "comma-separated percentages") from None
            ascending = all(a < b for a, b in zip(stages, stages[1:]))
            if not stages or not ascending or stages[0] <= 0 or stages[-1] != 100.0:
                raise bad(name, "ascending percentages in (0, 100] ending at 100, such as '1,5,20,50,100'")
        labels = parameters.get(_PREFIX + "labels", "false").strip().lower()
        if labels not in ("true", "false"):
            raise bad(_PREFIX + "labels", "true or false")
        gates: tuple[str, ...] = ()
        name = _PREFIX + "gates"
        if name in parameters:
            gates = tuple(g.strip() for g in parameters[name].split(",") if g.strip())
            known_gates = ("errors", "latency", "outputs", "accuracy")
            if not gates or any(g not in known_gates for g in gates) or len(set(gates)) != len(gates):
                raise bad(name, f"distinct gates among {list(known_gates)}, comma-separated")
            if "accuracy" in gates and labels != "true":
                raise bad(name, "without 'accuracy' unless fleet.rollout.labels is true (no labels to judge)")
        return cls(
            mode=mode, stages=stages,
            false_rollback_rate=number("false_rollback_rate", cls.false_rollback_rate, 0.0, 0.25, open_low=True),
            accuracy_weight=number("accuracy_weight", cls.accuracy_weight, 0.0, 1000.0, open_low=True),
            min_stage_requests=number("min_stage_requests", cls.min_stage_requests, 1, 10**9, integer=True),
            min_stage_s=number("min_stage_s", cls.min_stage_s, 0.0, 86400.0 * 30),
            max_stage_s=number("max_stage_s", cls.max_stage_s, 1.0, 86400.0 * 30),
            shadow_share=number("shadow_share", cls.shadow_share, 0.0, 1.0, open_low=True),
            labels=labels == "true",
            min_stage_labels=number("min_stage_labels", cls.min_stage_labels, 1, 10**9, integer=True),
            baseline_requests=number("baseline_requests", cls.baseline_requests, 1, 10**9, integer=True),
            latency_warmup_s=number("latency_warmup_s", cls.latency_warmup_s, 0.0, 3600.0),
            gates=gates,
        )


def rollout_config(spec) -> RolloutConfig | None:
    """The model's rollout settings when it rolls out progressively (canary or shadow mode and a
    version_policy serving one version), else None (`immediate`, or a policy serving several)."""
    config = RolloutConfig.from_parameters(spec.parameters, f"{spec.name}/config.pbtxt")
    policy = spec.version_policy
    if not config.progressive or policy.kind != "latest" or policy.num_versions != 1:
        return None
    return config
