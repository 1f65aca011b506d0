"""The canary judge: per tick of evidence, roll back, pass the stage, or hold.

Each tick (about 1 s) the controller hands over what stable and candidate did since the last
one. Every gate is an anytime-valid test (serving/rollout/sequential.py), read after every tick
for the whole rollout, so a candidate no worse than stable is rolled back with probability at
most `false_rollback_rate` however long it is watched. That rate is split over the active gates
(those in `gates`; `accuracy` only with `labels_expected`) by weight (a weighted Bonferroni): each
gate weighs 1 but `accuracy`, which weighs `accuracy_weight` (6). A gate rejects when its log
e-value reaches ln(1 / its share); any rejection rolls back. The weights follow the evidence:
errors, latency and outputs see every canary request and a smaller share costs them little
(ln 2 nats, one or two requests for a crash), while labelled pairs are scarce and the sign test
needs about 75 more of them at 6 % discordance for each halving of its share (benchmarks/README.md).

- `errors`: failed requests, one-sided, share = candidate requests / all requests of the tick.
- `latency`: successes at or above three edges (the `LATENCY_EDGES_S` edges nearest stable's
  p50, p90, p99), one-sided, share = candidate successes / all successes. The edges are fixed
  from stable's first `latency_baseline_requests` successes of the rollout; testing starts at
  the next tick, so the baseline is never tested against itself. The first `latency_warmup_s`
  seconds of ticks are not judged for latency (nor taken into the baseline): a version's first
  seconds of traffic run its cold paths (new batch shapes, its log partition), and at a few
  thousand canary requests a second they alone rolled an identical copy back.
- `outputs`: the output histogram, two-sided per group of bins, share = candidate outputs / all.
  Groups are fixed from stable's first `outputs_baseline_scores` outputs: adjacent bins merged
  until a group holds `MIN_GROUP_SHARE` of stable's mass, the rare bins at the end a group of
  their own (where changed outputs show most). Not a product of per-bin tests: with the share
  measured in the same tick the bins' candidate counts are dependent (they sum to the
  candidate's outputs) and such a product can exceed 1 in expectation under H0 (one bin up,
  another down).
- `accuracy`: shadow pairs through the sign test on discordant pairs (`PairedTest`), or without
  pairs wrong answers, one-sided, share = candidate labelled / all labelled; the first tick that
  brings labels fixes which.

A gate with several tests (thresholds, groups) uses their average e-value: a mixture, itself a
test supermartingale, never weaker than a Bonferroni over them. A stage passes when no gate
rejected and each active gate has its evidence since the stage started (`min_stage_requests`
candidate requests, tested successes, tested outputs; `min_stage_labels` labels or pairs); less
holds, with the reason: the judge never passes nor rolls back on missing data. Tests are never
reset; `new_stage` resets only the per-stage evidence and the stage's age.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from serving.rollout.sequential import AllocationTest, PairedTest

__all__ = ["JudgeSettings", "Verdict", "Judge", "replay", "LATENCY_EDGES_S", "GATES", "LATENCY_QUANTILES",
           "MIN_GROUP_SHARE"]

# Seconds, log-spaced from 0.1 ms to 30 s, ratio 1.12: a 1.5x slowdown moves a request about 3.6 buckets.
# The same edges as serving/rollout/evidence.py bins with: len(LATENCY_EDGES_S) + 1 buckets.
LATENCY_EDGES_S = tuple(float(x) for x in np.geomspace(1e-4, 30.0, 112))
GATES = ("errors", "latency", "outputs", "accuracy")
LATENCY_QUANTILES = (0.5, 0.9, 0.99)
MIN_GROUP_SHARE = 0.02  # an output group holds at least this share of stable's baseline outputs


@dataclass(frozen=True)
class JudgeSettings:
    """The judge's settings: total false-rollback probability, per-stage evidence, baselines."""

    false_rollback_rate: float = 0.002  # P(any rollback of a candidate no worse than stable), whole rollout
    min_stage_requests: int = 200  # candidate requests (and tested successes, outputs) per stage
    min_stage_labels: int = 200  # candidate labelled predictions, or shadow pairs, per stage
    latency_baseline_requests: int = 2000  # stable successes that fix the latency thresholds
    outputs_baseline_scores: int = 2000  # stable outputs that fix the output groups
    latency_warmup_s: float = 10.0  # the rollout's first seconds of ticks, not judged for latency
    labels_expected: bool = False
    gates: tuple[str, ...] = GATES
    accuracy_weight: float = 6.0  # the accuracy gate's share of false_rollback_rate against 1 for each other gate

    def __post_init__(self):
        if not isinstance(self.false_rollback_rate, (int, float)) or not 0 < self.false_rollback_rate < 0.5:
            raise ValueError(f"false_rollback_rate must be in (0, 0.5), got {self.false_rollback_rate!r}")
        for name in ("min_stage_requests", "min_stage_labels", "latency_baseline_requests",
                     "outputs_baseline_scores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        warmup = self.latency_warmup_s
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < math.inf:
            raise ValueError(f"latency_warmup_s must be seconds >= 0, got {warmup!r}")
        weight = self.accuracy_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ValueError(f"accuracy_weight must be a number > 0, got {weight!r}")
        if not isinstance(self.labels_expected, bool):
            raise ValueError(f"labels_expected must be true or false, got {self.labels_expected!r}")
        gates = (self.gates,) if isinstance(self.gates, str) else tuple(self.gates)
        unknown = [g for g in gates if g not in GATES]
        if unknown or not gates or len(set(gates)) != len(gates):
            raise ValueError(f"gates must be distinct names among {GATES}, got {self.gates!r}")
        object.__setattr__(self, "gates", tuple(g for g in GATES if g in gates))
        if not self.active_gates:
            raise ValueError(f"no gate is active: gates={self.gates!r} with labels_expected={self.labels_expected}")

    @property
    def active_gates(self) -> tuple[str, ...]:
        return tuple(g for g in self.gates if g != "accuracy" or self.labels_expected)

    @property
    def gate_alphas(self) -> dict[str, float]:
        """Each active gate's share of the false-rollback rate (weighted Bonferroni; they sum to it)."""
        weights = {g: self.accuracy_weight if g == "accuracy" else 1.0 for g in self.active_gates}
        total = sum(weights.values())
        return {g: self.false_rollback_rate * w / total for g, w in weights.items()}

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc["gates"] = list(self.gates)
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> JudgeSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown judge settings {unknown}; allowed: {sorted(known)}")
        return cls(**doc)


@dataclass
class Verdict:
    """One tick's decision, each gate's state, and why. `gates[name]`: state ("reject", "pass",
    "hold"), statistic (log e-value), threshold (its rejection level), estimate (candidate /
    stable rate ratio of the test that moved most; None before any), n and needed (the stage's
    evidence), reason."""

    decision: str
    gates: dict = field(default_factory=dict)
    reason: str = ""
    stage: int = 0
    stage_ticks: int = 0
    stage_age_s: float = 0.0  # seconds of ticks in this stage, for the controller's max_stage_s alarm

    def to_dict(self) -> dict:
        return asdict(self)


def _count(doc: dict, key: str, where: str) -> int:
    value = doc.get(key) or 0
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or n != value:
        raise ValueError(f"{where}.{key} must be a count >= 0, got {value!r}")
    return n


def _histogram(doc: dict, key: str, where: str, length: int | None) -> np.ndarray | None:
    value = doc.get(key)
    if value is None or len(value) == 0:
        return None
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or (length is not None and arr.size != length):
        raise ValueError(f"{where}.{key} must be {length or 'a list of'} counts, got shape {arr.shape}")
    if not (np.isfinite(arr).all() and arr.min() >= 0):
        raise ValueError(f"{where}.{key} must hold counts >= 0")
    return arr


@dataclass
class _Side:
    requests: int
    errors: int
    latency: np.ndarray | None
    scores: np.ndarray | None
    labelled: int
    wrong: int

    @classmethod
    def parse(cls, doc: dict | None, where: str, n_scores: int | None) -> _Side:
        doc = doc or {}
        side = cls(_count(doc, "requests", where), _count(doc, "errors", where),
                   _histogram(doc, "latency", where, len(LATENCY_EDGES_S) + 1),
                   _histogram(doc, "scores", where, n_scores), _count(doc, "labelled", where),
                   _count(doc, "wrong", where))
        if side.errors > side.requests:
            raise ValueError(f"{where}.errors ({side.errors}) exceeds {where}.requests ({side.requests})")
        if side.wrong > side.labelled:
            raise ValueError(f"{where}.wrong ({side.wrong}) exceeds {where}.labelled ({side.labelled})")
        return side


def _share(candidate: float, stable: float) -> float:
    total = candidate + stable
    return candidate / total if total > 0 else 0.0


class _Gate:
    """A gate: its test (None until its baseline is in), the stage's evidence count, its state.
    `saved` names the attributes its JSON state holds besides the test and the count."""

    name, unit, differs, saved = "", "candidate requests", "candidate worse than stable", ()

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.test = None
        self.stage_n = 0

    def entry(self, settings: JudgeSettings) -> dict:
        needed = settings.min_stage_labels if self.name == "accuracy" else settings.min_stage_requests
        test = self.test
        entry = {"state": "hold", "statistic": 0.0, "threshold": None, "estimate": None, "n": self.stage_n,
                 "needed": needed, "reason": ""}
        if test is None:
            entry["reason"] = f"{self.name}: {self.waiting()}"
            return entry
        entry.update(statistic=round(test.log_mixture, 6), threshold=round(test.threshold, 6), **self.extra())
        if (test.test if isinstance(test, PairedTest) else test).ticks:
            entry["estimate"] = round(float(test.estimate), 6)
        if test.rejected:
            entry.update(state="reject", reason=f"{self.name}: {self.differs} (ratio {entry['estimate']:.3g}; log "
                         f"e-value {entry['statistic']:.2f} reached {entry['threshold']:.2f})")
        elif self.stage_n < needed:
            entry["reason"] = f"{self.name}: {self.stage_n} of {needed} {self.unit} this stage"
        else:
            entry.update(state="pass", reason=f"{self.name}: no regression in {self.stage_n} {self.unit}")
        return entry

    def waiting(self) -> str:
        return "no data yet"

    def extra(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        doc = {"test": None if self.test is None else self.test.to_dict(), "stage_n": self.stage_n}
        for key in self.saved:
            value = getattr(self, key)
            doc[key] = value.tolist() if isinstance(value, np.ndarray) else value
        return doc

    def load(self, doc: dict) -> None:
        for key in self.saved:
            setattr(self, key, doc[key])
        kind = PairedTest if getattr(self, "mode", None) == "paired" else AllocationTest
        self.test = None if doc["test"] is None else kind.from_dict(doc["test"])
        self.stage_n = int(doc["stage_n"])


class _Errors(_Gate):
    name = "errors"

    def __init__(self, alpha: float):
        super().__init__(alpha)
        self.test = AllocationTest(alpha, "greater")

    def update(self, s: _Side, c: _Side, paired: dict | None) -> None:
        self.test.update(c.errors, s.errors, _share(c.requests, s.requests))
        self.stage_n += c.requests


class _Baselined(_Gate):
    """A gate whose test waits for a baseline of stable's histogram, then is fixed for the rollout."""

    def __init__(self, alpha: float, baseline_n: int):
        super().__init__(alpha)
        self.baseline_n = baseline_n
        self.baseline: np.ndarray | None = None

    def update(self, s: _Side, c: _Side, paired: dict | None) -> None:
        hs, hc = self.histograms(s, c)
        if self.test is not None:
            if hs is not None or hc is not None:
                zs = np.zeros(self.size) if hs is None else hs
                zc = np.zeros(self.size) if hc is None else hc
                self.test.update(self.events(zc), self.events(zs), _share(zc.sum(), zs.sum()))
                self.stage_n += int(zc.sum())
            return
        if hs is not None:  # the baseline's ticks are never tested: the test starts at the next tick
            self.baseline = hs.copy() if self.baseline is None else self.baseline + hs
            if self.baseline.sum() >= self.baseline_n:
                self.fix(self.baseline)

    def waiting(self) -> str:
        have = 0 if self.baseline is None else int(self.baseline.sum())
        return f"stable's baseline has {have} of {self.baseline_n} {self.unit.replace('candidate ', '')}"

    def load(self, doc: dict) -> None:
        super().load(doc)
        self.baseline = None if self.baseline is None else np.asarray(self.baseline, dtype=np.float64)


class _Latency(_Baselined):
    name, unit, saved = "latency", "candidate successes", ("baseline", "edges")
    size = len(LATENCY_EDGES_S) + 1

    def __init__(self, alpha: float, baseline_n: int):
        super().__init__(alpha, baseline_n)
        self.edges: list[int] = []  # indices into LATENCY_EDGES_S: events are successes at or above that edge
        self.warming_s = 0.0  # seconds of the rollout's warm-up left (the judge skips this gate's ticks until 0)

    def waiting(self) -> str:
        if self.warming_s > 0:
            return f"the rollout's first seconds are not judged ({self.warming_s:.0f} s of warm-up left)"
        return super().waiting()

    def histograms(self, s: _Side, c: _Side):
        return s.latency, c.latency

    def fix(self, baseline: np.ndarray) -> None:
        below = np.cumsum(baseline)[:-1] / baseline.sum()  # share of stable below each edge
        self.edges = list(dict.fromkeys(int(np.argmin(np.abs(below - q))) for q in LATENCY_QUANTILES))
        self.test = AllocationTest(self.alpha, "greater", streams=len(self.edges))

    def events(self, hist: np.ndarray) -> np.ndarray:
        return hist.sum() - np.cumsum(hist)[self.edges]

    def extra(self) -> dict:
        return {"thresholds_s": [LATENCY_EDGES_S[i] for i in self.edges],
                "leading_threshold_s": LATENCY_EDGES_S[self.edges[self.test.leading_stream]]}


class _Outputs(_Baselined):
    name, unit, saved = "outputs", "candidate outputs", ("baseline", "size", "starts")
    differs = "candidate's outputs differ from stable's"

    def __init__(self, alpha: float, baseline_n: int, size: int | None):
        super().__init__(alpha, baseline_n)
        self.size = size
        self.starts: list[int] = []  # first bin of each group

    def histograms(self, s: _Side, c: _Side):
        return s.scores, c.scores

    def fix(self, baseline: np.ndarray) -> None:
        starts, mass = [0], 0.0
        for i, m in enumerate(baseline / baseline.sum()):
            if mass >= MIN_GROUP_SHARE:
                starts.append(i)
                mass = 0.0
            mass += m
        self.starts = starts
        self.test = AllocationTest(self.alpha, "two-sided", streams=len(starts))

    def events(self, hist: np.ndarray) -> np.ndarray:
        return np.add.reduceat(hist, self.starts)

    def extra(self) -> dict:
        lead = self.test.leading_stream
        end = self.starts[lead + 1] if lead + 1 < len(self.starts) else self.size
        return {"groups": len(self.starts), "leading_bins": [self.starts[lead], end - 1]}


class _Accuracy(_Gate):
    name, unit, saved = "accuracy", "candidate labels", ("mode", "unit")
    differs = "candidate less accurate than stable"

    def __init__(self, alpha: float):
        super().__init__(alpha)
        self.mode: str | None = None  # "paired" (shadow pairs, sign test) or "labels" (wrong answers)

    def update(self, s: _Side, c: _Side, paired: dict | None) -> None:
        if self.mode is None:
            if paired and paired["pairs"] > 0:
                self.mode, self.test, self.unit = "paired", PairedTest(self.alpha), "labelled pairs"
            elif s.labelled + c.labelled > 0:
                self.mode, self.test = "labels", AllocationTest(self.alpha, "greater")
        if self.mode == "paired" and paired:
            self.test.update(paired["stable_only_right"], paired["candidate_only_right"], paired["pairs"])
            self.stage_n += paired["pairs"]
        elif self.mode == "labels":
            self.test.update(c.wrong, s.wrong, _share(c.labelled, s.labelled))
            self.stage_n += c.labelled

    def waiting(self) -> str:
        return "no labels yet"

    def extra(self) -> dict:
        return {"mode": self.mode, "accuracy_delta": self.test.accuracy_delta if self.mode == "paired" else None}


def _parse_paired(paired: dict | None) -> dict | None:
    if paired is None:
        return None
    out = {k: _count(paired, k, "paired") for k in ("pairs", "stable_only_right", "candidate_only_right")}
    if out["stable_only_right"] + out["candidate_only_right"] > out["pairs"]:
        raise ValueError(f"paired: discordant pairs exceed pairs ({paired!r})")
    return out


class Judge:
    """The sequential judge of one rollout: `update` once per tick, `new_stage` when the stage
    advances, `to_dict`/`from_dict` to survive a controller restart (exact resume)."""

    def __init__(self, settings: JudgeSettings, n_score_bins: int | None = None):
        if n_score_bins is not None and (isinstance(n_score_bins, bool) or int(n_score_bins) < 2):
            raise ValueError(f"n_score_bins must be an integer >= 2 or None, got {n_score_bins!r}")
        self.settings = settings
        a = settings.gate_alphas
        makers = {"errors": lambda: _Errors(a["errors"]),
                  "latency": lambda: _Latency(a["latency"], settings.latency_baseline_requests),
                  "outputs": lambda: _Outputs(a["outputs"], settings.outputs_baseline_scores, n_score_bins),
                  "accuracy": lambda: _Accuracy(a["accuracy"])}
        self.gates = {name: makers[name]() for name in settings.active_gates}
        self.n_score_bins = n_score_bins
        self.stage = self.stage_requests = self.stage_ticks = self.ticks = 0
        self.stage_age_s = self.age_s = 0.0

    def update(self, stable: dict, candidate: dict, paired: dict | None = None, *, elapsed_s: float = 1.0) -> Verdict:
        """One tick: each version's counts since the last tick (keys optional, missing = 0),
        optional shadow pairs with labels, and the tick's length in seconds (for `stage_age_s`)."""
        if not (isinstance(elapsed_s, (int, float)) and math.isfinite(elapsed_s) and elapsed_s >= 0):
            raise ValueError(f"elapsed_s must be seconds >= 0, got {elapsed_s!r}")
        s = _Side.parse(stable, "stable", self.n_score_bins)
        c = _Side.parse(candidate, "candidate", self.n_score_bins)
        if self.n_score_bins is None:
            sizes = {h.size for h in (s.scores, c.scores) if h is not None}
            if len(sizes) > 1:
                raise ValueError(f"stable and candidate score histograms differ in length: {sorted(sizes)}")
            if sizes:
                self.n_score_bins = sizes.pop()
                if "outputs" in self.gates:
                    self.gates["outputs"].size = self.n_score_bins
        p = _parse_paired(paired)
        self.age_s += float(elapsed_s)
        for name, gate in self.gates.items():
            if name == "latency":
                gate.warming_s = max(0.0, self.settings.latency_warmup_s - self.age_s)
                if gate.warming_s > 0:
                    continue
            gate.update(s, c, p)
        self.stage_requests += c.requests
        self.stage_ticks += 1
        self.stage_age_s += float(elapsed_s)
        self.ticks += 1
        return self.verdict()

    def verdict(self) -> Verdict:
        """The decision on the evidence so far (what `update` returns)."""
        entries = {name: gate.entry(self.settings) for name, gate in self.gates.items()}
        rejected = [e["reason"] for e in entries.values() if e["state"] == "reject"]
        held = [e["reason"] for e in entries.values() if e["state"] == "hold"]
        need = self.settings.min_stage_requests
        if rejected:
            decision, reason = "rollback", "; ".join(rejected)
        elif held or self.stage_requests < need:
            decision = "hold"
            reason = "; ".join(held or [f"candidate has {self.stage_requests} of {need} requests this stage"])
        else:
            decision, reason = "pass", f"every gate has its evidence and none rejected ({', '.join(entries)})"
        return Verdict(decision, entries, reason, self.stage, self.stage_ticks, round(self.stage_age_s, 6))

    def new_stage(self) -> None:
        """The stage advanced: reset the per-stage evidence and age; the tests carry on."""
        self.stage += 1
        self.stage_requests = self.stage_ticks = 0
        self.stage_age_s = 0.0
        for gate in self.gates.values():
            gate.stage_n = 0

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "n_score_bins": self.n_score_bins, "stage": self.stage,
                "stage_requests": self.stage_requests, "stage_ticks": self.stage_ticks,
                "stage_age_s": self.stage_age_s, "ticks": self.ticks, "age_s": self.age_s,
                "gates": {name: gate.to_dict() for name, gate in self.gates.items()}}

    @classmethod
    def from_dict(cls, doc: dict) -> Judge:
        try:
            judge = cls(JudgeSettings.from_dict(doc["settings"]), doc["n_score_bins"])
            if set(doc["gates"]) != set(judge.gates):
                raise ValueError(f"saved gates {sorted(doc['gates'])} do not match the settings' "
                                 f"{sorted(judge.gates)}")
            for name, gate in judge.gates.items():
                gate.load(doc["gates"][name])
            judge.stage, judge.stage_requests = int(doc["stage"]), int(doc["stage_requests"])
            judge.stage_ticks, judge.ticks = int(doc["stage_ticks"]), int(doc["ticks"])
            judge.stage_age_s = float(doc["stage_age_s"])
            judge.age_s = float(doc.get("age_s", doc["stage_age_s"]))  # (a state saved before warm-ups existed)
        except KeyError as exc:
            raise ValueError(f"a judge state needs the key {exc.args[0]!r}") from exc
        return judge


def replay(settings: dict, ticks: list[dict], n_score_bins: int | None = None) -> list[Verdict]:
    """Re-run a rollout's recorded ticks through a fresh judge: one Verdict per tick with data.

    A tick is {"stable": {...}, "candidate": {...}, "paired": {...} or absent, "elapsed_s": s or
    absent, "new_stage": bool}; `new_stage` advances the stage before the tick's data, and a tick
    with only `new_stage` yields no verdict (the controller records the advance as a line of its
    own). Same inputs, same verdicts: the judge has no clock and no randomness.
    """
    judge = Judge(JudgeSettings.from_dict(settings), n_score_bins)
    out = []
    for tick in ticks:
        if tick.get("new_stage"):
            judge.new_stage()
        if "stable" in tick or "candidate" in tick:
            out.append(judge.update(tick.get("stable") or {}, tick.get("candidate") or {}, tick.get("paired"),
                                    elapsed_s=tick.get("elapsed_s", 1.0)))
    return out
