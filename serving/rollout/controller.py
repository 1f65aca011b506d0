"""The rollout controller: the one writer of every model's rollout.json, in the monitor actor.

Each tick (and each replica push that carries rollout evidence) it moves a model's rollout on:

- a model that rolls out progressively (serving/rollout/config.py) and has no rollout.json gets
  one naming the version it serves as stable;
- a newer accepted version that was never rolled back becomes the candidate: stage 0, the
  candidate takes `stages[0]` % of the routing keys;
- every push's evidence (per version: requests, errors, latency and output histograms) is one
  tick of the judge (serving/rollout/judge.py), candidate against stable on the same traffic:
  `rollback` sets the candidate's weight to 0 at once (the pushing replica gets the new route in
  the push's answer, the others within their next push), marks the version rolled back in
  rollout.json and its metadata.json, never to be served again by the automation; `pass`
  (enough evidence, no gate rejected, at least `min_stage_s`) moves to the next stage; the
  stage before 100 % passing promotes the candidate to stable; `hold` past `max_stage_s`
  raises the stage alarm;
- every decision is a line of `<data>/audit/rollout.jsonl` with its evidence, and every judge
  tick a line of `<data>/audit/rollout-ticks/<model>-<rollout id>.jsonl`, so
  `fleet rollout replay` re-runs the judge and reproduces each decision (serving/rollout/replay.py).

The judge's state is saved in rollout.json at every decision and at least every `_SAVE_EVERY_S`,
so a controller killed at any moment resumes from the file (the evidence since the last save is
gathered again, never invented).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from serving.errors import FleetError, InvalidInput, ModelNotFound
from serving.monitoring.alerts import AuditLog
from serving.registry import ModelRepository
from serving.rollout.arms import ArmTotals, SampleRatio, ShadowTotals
from serving.rollout.config import RolloutConfig, rollout_config
from serving.rollout.judge import Judge, JudgeSettings
from serving.rollout.state import RolloutState, read_rollout, write_rollout

__all__ = ["RolloutController", "ACTIONS"]

_log = logging.getLogger("fleet.rollout")

ACTIONS = ("start", "pause", "resume", "promote", "abort")
# Decisions logged as warnings where they are taken; the others are logged at INFO as they are audited.
_WARNED = frozenset({"start", "promote", "rollback", "abort", "supersede", "alarm"})
_SAVE_EVERY_S = 5.0
_SCAN_EVERY_S = 2.0  # the repository is read for new versions at most this often


def judge_settings(config: RolloutConfig) -> JudgeSettings:
    return JudgeSettings(false_rollback_rate=config.false_rollback_rate, accuracy_weight=config.accuracy_weight,
                         min_stage_requests=config.min_stage_requests,
                         min_stage_labels=config.min_stage_labels, labels_expected=config.labels,
                         latency_baseline_requests=config.baseline_requests,
                         outputs_baseline_scores=config.baseline_requests, gates=config.decisive_gates,
                         latency_warmup_s=config.latency_warmup_s)


class _Model:
    """The controller's view of one model: its state, settings and live judge."""

    def __init__(self, state: RolloutState, config: RolloutConfig):
        self.state = state
        self.config = config
        self.judge: Judge | None = None
        if state.status not in ("idle", "ab") and state.candidate is not None:  # (an A/B experiment has no judge)
            self.judge = Judge.from_dict(state.judge) if state.judge else Judge(judge_settings(config))
        self.saved_at = time.monotonic()
        self.decisions: dict[str, int] = {}
        self.fresh()

    def fresh(self) -> None:
        """The in-memory summaries of a rollout that (re)starts: per-arm totals, shadow pairs, A/B ratio."""
        self.arms = ArmTotals()
        self.shadow = ShadowTotals()
        split = self.state.weight if self.state.status == "ab" else None
        self.ratio = SampleRatio(split) if split else None


class RolloutController:
    def __init__(self, options: dict, *, clock=time.time, input_alarms=None):
        """`input_alarms(model, version)`: the version's input streams in drift alarm now (the monitor's)."""
        self.repository = ModelRepository(options["repository"])
        self._input_alarms = input_alarms
        data_dir = options.get("data_dir")
        self.audit_dir = options.get("audit_dir")  # set when the data folder is on an object store
        self.audit = AuditLog(data_dir, "rollout.jsonl", audit_dir=self.audit_dir)
        self.data_dir = data_dir
        self._clock = clock
        self._lock = threading.RLock()
        self.models: dict[str, _Model] = {}
        self._configs: dict[str, RolloutConfig | None] = {}
        self._scanned_at = -float("inf")

    # -- what the monitor actor calls -------------------------------------------------------
    def routes(self) -> dict:
        """{model: Route as a dict} for every model with a rollout state (the answer to a push)."""
        with self._lock:
            return {name: m.state.route.to_dict() for name, m in self.models.items()}

    def intake(self, evidence: dict) -> None:
        """One replica's evidence since its last push ({model: {version: counts}}): a judge tick per model."""
        if not evidence:
            return
        with self._lock:
            for model, versions in evidence.items():
                m = self.models.get(model)
                if m is None or m.state.status == "idle":
                    continue
                failed = versions.get("load_failed", {}).get(str(m.state.candidate))
                if failed is not None:
                    self._finish(m, "rollback", self._clock(), reason=f"the candidate failed to load: {failed}")
                    continue
                stable = versions.get(str(m.state.stable), {})
                candidate = versions.get(str(m.state.candidate), {})
                for version, counts in ((m.state.stable, stable), (m.state.candidate, candidate)):
                    if counts:
                        m.arms.add(str(version), counts)
                if m.state.status == "ab":
                    self._sample_ratio(m, int(candidate.get("requests", 0)), int(stable.get("requests", 0)))
                    continue
                if m.state.status == "shadow":
                    if not versions.get("shadow"):
                        continue
                    stable, candidate = m.shadow.add(versions["shadow"])
                if m.judge is None or (not stable and not candidate):
                    continue
                self._judge(model, m, stable, candidate)

    def labels(self, joined: dict) -> None:
        """What the monitor's label join found since the last call (`MonitoringEngine.take_rollout_labels`):
        a judge tick per model in a rollout, with each side's labelled and wrong predictions and, where a
        shadow candidate answered the same requests, the discordant pairs."""
        with self._lock:
            for model, m in self.models.items():
                state = m.state
                if m.judge is None or state.status == "idle":
                    continue
                s = joined["versions"].get((model, state.stable))
                c = joined["versions"].get((model, state.candidate))
                a, b = sorted((state.stable, state.candidate))
                pairs = joined["pairs"].get((model, a, b))
                paired = None
                if pairs is not None:
                    a_right, b_right, n = pairs
                    stable_only, candidate_only = (a_right, b_right) if a == state.stable else (b_right, a_right)
                    paired = {"pairs": n, "stable_only_right": stable_only, "candidate_only_right": candidate_only}
                if s is None and c is None and paired is None:
                    continue
                stable = {"labelled": s[0], "wrong": s[1]} if s else {}
                candidate = {"labelled": c[0], "wrong": c[1]} if c else {}
                self._judge(model, m, stable, candidate, paired)

    def tick(self) -> None:
        """Look for new versions (every `_SCAN_EVERY_S`), check stage ages, save the judges' state."""
        now = self._clock()
        if time.monotonic() - self._scanned_at >= _SCAN_EVERY_S:
            self._scanned_at = time.monotonic()
            self._scan(now)
        with self._lock:
            for model, m in self.models.items():
                if m.judge is not None and time.monotonic() - m.saved_at >= _SAVE_EVERY_S:
                    self._write(m, m.state.evolve(judge=m.judge.to_dict(), now=now))

    # -- scanning the repository ----------------------------------------------------------------
    def _scan(self, now: float) -> None:
        try:
            names = self.repository.list_models()
        except OSError as exc:
            _log.warning("rollout: cannot list the repository: %s", exc)
            return
        for model in names:
            try:
                self._scan_model(model, now)
            except (FleetError, OSError) as exc:
                _log.warning("rollout of model %s: %s", model, exc)

    def _scan_model(self, model: str, now: float) -> None:
        spec = self.repository.spec(model)
        config = rollout_config(spec)
        if config is None:
            return
        accepted = self.repository.accepted_versions(model, spec)
        with self._lock:
            m = self.models.get(model)
            if m is None:
                state = read_rollout(self.repository, model)
                if state is None:  # first sight: the version served now is the stable one
                    usable = [v for v in accepted]
                    if not usable:
                        return
                    state = RolloutState(model, stable=usable[-1], mode=config.mode, stages=config.stages)
                    m = self.models[model] = _Model(state, config)
                    self._write(m, state.evolve({"event": "stable", "version": usable[-1]}, now=now))
                    self._record(m, "stable", version=usable[-1])
                else:
                    m = self.models[model] = _Model(state, config)
                    if m.judge is not None:
                        _log.info("model %s: resuming the rollout of version %s at stage %s", model,
                                  state.candidate, state.stage)
            m.config = config
            state = m.state
            if state.status == "idle":
                newer = [v for v in accepted if (state.stable is None or v > state.stable)
                         and v not in state.rolled_back]
                if newer:
                    self._start(m, newer[-1], now, by="new version")
            elif newer := [v for v in accepted if v > max(state.candidate or 0, state.stable or 0)
                           and v not in state.rolled_back]:
                # A version newer than both is published during the rollout: it replaces the candidate.
                self._finish(m, "supersede", now, reason=f"version {newer[-1]} was published during the rollout")
                self._start(m, newer[-1], now, by="new version")
            elif m.judge is not None and state.stage_started_at is not None:
                age = now - state.stage_started_at
                if age > config.max_stage_s and state.alarm is None:
                    reason = (f"stage {state.stage} ({state.weight:.0%}) held {age:.0f} s > max_stage_s "
                              f"{config.max_stage_s:.0f} s for lack of evidence: {state.evidence.get('reason')}")
                    self._write(m, state.evolve({"event": "alarm", "reason": reason}, now=now, alarm=reason))
                    self._record(m, "alarm", reason=reason)
                    _log.warning("model %s: %s", model, reason, extra=_fields(state, "alarm"))

    # -- transitions ----------------------------------------------------------------------------
    def _start(self, m: _Model, version: int, now: float, *, by: str, mode: str | None = None,
               split: float | None = None) -> None:
        config, state = m.config, m.state
        mode = mode or config.mode
        m.judge = Judge(judge_settings(config)) if mode != "ab" else None
        weight = config.stages[0] / 100.0 if mode == "canary" else split if mode == "ab" else 0.0
        shadow = config.shadow_share if mode == "shadow" else 0.0
        new = state.evolve({"event": "start", "version": version, "by": by, "mode": mode}, now=now,
                           candidate=version, status=mode, mode=mode, stage=0, stages=config.stages, weight=weight,
                           shadow_share=shadow, rollout_id=f"{version}-{int(now)}", started_at=now,
                           stage_started_at=now, evidence={}, judge=m.judge.to_dict() if m.judge else {},
                           alarm=None)
        self._write(m, new)
        m.fresh()
        self._record(m, "start", version=version, by=by, weight=weight, mode=mode)
        if m.judge is not None:
            self._tick_record(m, {"settings": judge_settings(config).to_dict()})  # what a replay starts from
        _log.warning("model %s: rolling out version %s (%s) next to stable %s", state.model, version, mode,
                     state.stable, extra=_fields(new, "start"))

    def _judge(self, model: str, m: _Model, stable: dict, candidate: dict, paired: dict | None = None) -> None:
        verdict = m.judge.update(stable, candidate, paired)
        self._tick_record(m, {"stable": stable, "candidate": candidate, "paired": paired,
                              "decision": verdict.decision})
        now = self._clock()
        m.state = _with_evidence(m.state, verdict.to_dict())
        if verdict.decision == "rollback":
            self._finish(m, "rollback", now, reason=verdict.reason, evidence=verdict.to_dict())
        elif verdict.decision == "pass" and m.state.status in ("canary", "shadow"):
            drifting = self._input_alarms(model, m.state.candidate) if self._input_alarms else []
            if drifting:  # the input gate: never promoted while its inputs drift from what it was trained on
                m.state = _with_evidence(m.state, {**verdict.to_dict(), "decision": "hold", "reason": (
                    f"input drift: the candidate's drift alarm holds on {', '.join(drifting)}")})
            elif now - (m.state.stage_started_at or now) >= m.config.min_stage_s:
                self._advance(m, now, verdict.to_dict())

    def _advance(self, m: _Model, now: float, evidence: dict) -> None:
        state = m.state
        if state.status == "shadow":  # the shadow stage passed: the canary stages follow, from the first
            m.judge.new_stage()
            self._tick_record(m, {"new_stage": True})
            weight = state.stages[0] / 100.0
            self._write(m, state.evolve({"event": "stage", "stage": 0, "weight": weight, "from": "shadow"}, now=now,
                                        status="canary", stage=0, weight=weight, shadow_share=0.0,
                                        stage_started_at=now, alarm=None, judge=m.judge.to_dict()))
            self._record(m, "stage", stage=0, weight=weight, evidence=evidence, shadow=m.shadow.report())
            return
        nxt = state.stage + 1
        if nxt >= len(state.stages) - 1:  # the stage before 100 % passed: the candidate takes everything
            self._finish(m, "promote", now, reason="every stage passed its gates", evidence=evidence)
            return
        m.judge.new_stage()
        self._tick_record(m, {"new_stage": True})
        weight = state.stages[nxt] / 100.0
        self._write(m, state.evolve({"event": "stage", "stage": nxt, "weight": weight}, now=now, stage=nxt,
                                    weight=weight, stage_started_at=now, alarm=None, judge=m.judge.to_dict()))
        self._record(m, "stage", stage=nxt, weight=weight, evidence=evidence)

    def _sample_ratio(self, m: _Model, candidate: int, stable: int) -> None:
        if m.ratio is None or m.state.alarm is not None or not m.ratio.add(candidate, stable):
            return
        report = m.ratio.report()
        reason = (f"sample ratio mismatch: the candidate has {report['observed']:.2%} of the requests, the split is "
                  f"{report['split']:.2%} (log e-value {report['log_e_value']} >= {report['threshold']}): the arms "
                  "do not see comparable traffic")
        self._write(m, m.state.evolve({"event": "alarm", "reason": reason}, now=self._clock(), alarm=reason))
        self._record(m, "alarm", reason=reason, evidence=report)
        _log.warning("model %s: %s", m.state.model, reason, extra=_fields(m.state, "alarm"))

    def _finish(self, m: _Model, outcome: str, now: float, *, reason: str, evidence: dict | None = None,
                by: str = "judge") -> None:
        """Roll back, abort or promote: the rollout ends, one version serves."""
        state = m.state
        version = state.candidate
        if outcome == "promote":
            new = state.evolve({"event": "promote", "version": version, "by": by}, now=now, stable=version,
                               candidate=None, status="idle", weight=0.0, shadow_share=0.0, judge={}, alarm=None)
        else:  # rollback, abort (never served again by the automation) or supersede (a newer version replaces it)
            kept_out = state.rolled_back if outcome == "supersede" else tuple(sorted({*state.rolled_back, version}))
            new = state.evolve({"event": outcome, "version": version, "by": by, "reason": reason}, now=now,
                               candidate=None, status="idle", weight=0.0, shadow_share=0.0, judge={}, alarm=None,
                               rolled_back=kept_out)
        m.judge = None
        self._write(m, new)
        self._record(m, outcome, version=version, by=by, reason=reason, evidence=evidence,
                     arms=m.arms.report(), shadow=m.shadow.report() if m.shadow.pairs else None)
        m.decisions[outcome] = m.decisions.get(outcome, 0) + 1
        try:
            self.repository.update_metadata(state.model, version, {"rollout": {
                "outcome": {"promote": "promoted", "rollback": "rolled_back", "abort": "aborted",
                            "supersede": "superseded"}[outcome],
                "at": now, "rollout_id": state.rollout_id, "reason": reason, "by": by}})
        except (FleetError, OSError) as exc:
            _log.warning("model %s version %s: could not record the rollout outcome in its metadata: %s",
                         state.model, version, exc)
        _log.warning("model %s: %s of version %s (%s)", state.model, outcome, version, reason,
                     extra={**_fields(state, outcome), "version": str(version)})

    # -- administrator actions -----------------------------------------------------------------
    def status(self, model: str) -> dict:
        self._scan_if_unknown(model)
        with self._lock:
            m = self.models.get(model)
            if m is None:
                raise ModelNotFound(f"model {model!r} does not roll out progressively (fleet.rollout immediate, "
                                    "or a version_policy serving several versions) or is not in the repository")
            doc = {**m.state.to_dict(), "config": m.config.to_dict(), "decisions": dict(m.decisions)}
            if m.state.status != "idle":
                doc["arms"] = m.arms.report()
                if m.shadow.pairs or m.state.status == "shadow":
                    doc["shadow"] = m.shadow.report()
                if m.ratio is not None:
                    doc["sample_ratio"] = m.ratio.report()
            return doc

    def action(self, model: str, action: str, version: int | None = None, by: str = "admin",
               mode: str | None = None, split: float | None = None) -> dict:
        """An administrator's `action` (start: `version`, `mode` canary|shadow|ab and, for ab, `split`)."""
        if action not in ACTIONS:
            raise InvalidInput(f"unknown rollout action {action!r}; use one of {list(ACTIONS)}")
        self._scan_if_unknown(model)
        now = self._clock()
        with self._lock:
            m = self.models.get(model)
            if m is None:
                return self.status(model)  # raises the not-found answer
            state = m.state
            running = state.status != "idle"
            if action == "start":
                if running:
                    raise InvalidInput(f"model {model!r} is already rolling out version {state.candidate}; "
                                       "promote or abort it first")
                accepted = self.repository.accepted_versions(model)
                choices = [v for v in accepted if v != state.stable]
                if version is None:
                    if not choices or choices[-1] < (state.stable or 0):
                        raise InvalidInput(f"model {model!r} has no version newer than stable {state.stable} "
                                           f"to roll out; accepted versions: {accepted}")
                    version = choices[-1]
                if version not in choices:
                    raise InvalidInput(f"model {model!r}: version {version} is not an accepted version other than "
                                       f"the stable {state.stable}; accepted versions: {accepted}")
                if mode == "ab" and not (split is not None and 0.0 < split < 1.0):
                    raise InvalidInput(f"an A/B experiment needs a split in (0, 1) for the candidate, got {split!r}")
                self._start(m, version, now, by=by, mode=mode, split=split)
            elif not running:
                raise InvalidInput(f"model {model!r} has no rollout in progress to {action}; stable version "
                                   f"{state.stable}")
            elif action in ("pause", "resume") and state.mode != "canary":
                raise InvalidInput(f"model {model!r}: only a canary pauses and resumes; this rollout is "
                                   f"{state.status!r} (promote or abort it)")
            elif action == "pause":
                self._write(m, state.evolve({"event": "pause", "by": by}, now=now, status="paused"))
                self._record(m, "pause", by=by)
            elif action == "resume":
                self._write(m, state.evolve({"event": "resume", "by": by}, now=now, status=state.mode,
                                            stage_started_at=now))
                self._record(m, "resume", by=by)
            elif action == "promote":
                self._finish(m, "promote", now, reason="promoted by an administrator", by=by)
            else:
                self._finish(m, "abort", now, reason="aborted by an administrator", by=by)
        return self.status(model)

    def _scan_if_unknown(self, model: str) -> None:
        if model not in self.models:
            try:
                self._scan_model(model, self._clock())
            except (FleetError, OSError) as exc:
                _log.warning("rollout of model %s: %s", model, exc)

    # -- persistence and audit -----------------------------------------------------------------
    def _write(self, m: _Model, state: RolloutState) -> None:
        write_rollout(self.repository, state)
        m.state = state
        m.saved_at = time.monotonic()

    def _record(self, m: _Model, event: str, **fields) -> None:
        state = m.state
        self.audit.write({"event": event, "model": state.model, "rollout_id": state.rollout_id,
                          "stable": state.stable, "candidate": state.candidate, "stage": state.stage,
                          "epoch": state.epoch, **{k: v for k, v in fields.items() if v is not None}})
        if event not in _WARNED:
            _log.info("model %s: rollout %s (stable %s, candidate %s, stage %s, weight %.0f%%)", state.model, event,
                      state.stable, state.candidate, state.stage, 100 * state.weight, extra=_fields(state, event))

    def _tick_record(self, m: _Model, record: dict) -> None:
        if self.data_dir is None or m.state.rollout_id is None:
            return
        AuditLog(self.data_dir, f"rollout-ticks/{m.state.model}-{m.state.rollout_id}.jsonl",
                 audit_dir=self.audit_dir).write(record)


def _fields(state: RolloutState, decision: str) -> dict:
    """A decision's log fields (serving/telemetry/logs.py): the model, the version it is about, `rollout_<decision>`."""
    version = state.candidate if state.candidate is not None else state.stable
    return {"model": state.model, "version": None if version is None else str(version),
            "event": f"rollout_{decision}"}


def _with_evidence(state: RolloutState, evidence: dict) -> RolloutState:
    """The latest verdict kept in memory (written with the next save), the epoch unchanged: routes do not move."""
    return replace(state, evidence=evidence)
