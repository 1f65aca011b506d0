"""The canary judge on seeded simulated ticks: what a rollout would do (roll back, pass, hold),
exact resume from JSON, replay, and the settings and input checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import beta, norm

from serving.rollout.judge import LATENCY_EDGES_S, Judge, JudgeSettings, Verdict, replay

_EDGES = np.asarray(LATENCY_EDGES_S)
_SCORES = np.diff(beta.cdf(np.linspace(0, 1, 21), 0.5, 8))
_SCORES /= _SCORES.sum()


def _latency_probs(median_s: float) -> np.ndarray:
    cdf = norm.cdf((np.log(_EDGES) - math.log(median_s)) / 0.5)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


_FAST, _SLOW = _latency_probs(0.004), _latency_probs(0.006)


class _Traffic:
    """200 requests a tick, each to the candidate with probability `share`; shadow pairs of the canary's answered
    requests labelled `label_delay` ticks later (6 % discordant when equally accurate)."""

    def __init__(self, seed: int, *, share=0.05, error_rate=0.001, slow=False, outputs_changed=0.0,
                 only_stable_right=0.03, only_candidate_right=0.03, label_delay=30, paired=True):
        self.rng = np.random.default_rng(seed)
        self.share, self.error_rate, self.slow, self.changed = share, error_rate, slow, outputs_changed
        self.cells = [only_stable_right, only_candidate_right, 0.1 - only_candidate_right,
                      0.9 - only_stable_right]
        self.pending = [0] * label_delay
        self.paired = paired

    def tick(self) -> tuple[dict, dict, dict | None]:
        rng = self.rng
        n = rng.poisson(200)
        nc = rng.binomial(n, self.share)
        ns = n - nc
        es, ec = rng.binomial(ns, 0.001), rng.binomial(nc, self.error_rate)
        scores_c = (1 - self.changed) * _SCORES + self.changed / 20
        stable = {"requests": ns, "errors": es, "latency": rng.multinomial(ns - es, _FAST).tolist(),
                  "scores": rng.multinomial(ns - es, _SCORES).tolist()}
        candidate = {"requests": nc, "errors": ec,
                     "latency": rng.multinomial(nc - ec, _SLOW if self.slow else _FAST).tolist(),
                     "scores": rng.multinomial(nc - ec, scores_c).tolist()}
        self.pending.append(nc - ec)
        labelled = self.pending.pop(0)
        b, c, both_wrong, _ = (int(x) for x in rng.multinomial(labelled, self.cells))
        if not self.paired:  # labels without shadow pairs: each version's labelled predictions and wrong ones
            stable.update(labelled=labelled * 19, wrong=int(rng.binomial(labelled * 19, 0.1)))
            candidate.update(labelled=labelled, wrong=b + both_wrong)
            return stable, candidate, None
        return stable, candidate, {"pairs": labelled, "stable_only_right": b, "candidate_only_right": c}


def _run(judge: Judge, traffic: _Traffic, ticks: int, record: list | None = None) -> tuple[Verdict, int, int]:
    """Ticks until a rollback or `ticks`, advancing the stage on each pass: (last verdict, candidate requests,
    stages passed)."""
    canary = passes = 0
    for _ in range(ticks):
        stable, candidate, paired = traffic.tick()
        verdict = judge.update(stable, candidate, paired)
        canary += candidate["requests"]
        if record is not None:
            record.append({"stable": stable, "candidate": candidate, "paired": paired})
        if verdict.decision == "rollback":
            break
        if verdict.decision == "pass":
            passes += 1
            judge.new_stage()
            if record is not None:
                record.append({"new_stage": True})
    return verdict, canary, passes


def test_a_crashing_candidate_is_rolled_back_within_20_canary_requests_at_5_percent():
    for seed in range(30):
        verdict, canary, _ = _run(Judge(JudgeSettings()), _Traffic(seed, error_rate=1.0), 20)
        assert verdict.decision == "rollback" and canary <= 20, (seed, canary)
        assert verdict.gates["errors"]["state"] == "reject" and "errors" in verdict.reason


def test_an_aa_candidate_passes_stages_and_is_never_rolled_back():
    settings = JudgeSettings(labels_expected=True)
    for seed in range(5):
        verdict, canary, passes = _run(Judge(settings), _Traffic(100 + seed), 300)
        assert verdict.decision != "rollback", verdict.reason
        assert passes >= 8, (seed, passes)  # ~20 s a stage: 200 canary requests and 200 labelled pairs


@pytest.mark.parametrize("traffic, gate", [
    (dict(error_rate=0.05), "errors"),
    (dict(slow=True), "latency"),
    (dict(outputs_changed=0.1), "outputs"),
    (dict(only_stable_right=0.08, only_candidate_right=0.0, paired=False), "accuracy"),  # labels, no pairs
])
def test_each_regression_is_rolled_back_by_its_gate(traffic, gate):
    verdict, _, _ = _run(Judge(JudgeSettings(labels_expected=True)), _Traffic(7, **traffic), 1_000)
    assert verdict.decision == "rollback", verdict.reason
    assert verdict.gates[gate]["state"] == "reject" and verdict.reason.startswith(gate)
    share = JudgeSettings(labels_expected=True).gate_alphas[gate]  # 0.002 / 9, accuracy 0.002 * 6 / 9
    assert verdict.gates[gate]["statistic"] >= verdict.gates[gate]["threshold"] == pytest.approx(-math.log(share))


def test_the_rollout_s_first_seconds_are_not_judged_for_latency_and_a_slow_candidate_is_rolled_back_after():
    warm_up = JudgeSettings(gates=("errors", "latency"), latency_warmup_s=30.0)
    cold = _Traffic(3, share=0.5, slow=True)  # half the traffic, every candidate request slow: decided in a tick
    judge = Judge(warm_up)
    for _ in range(29):
        verdict = judge.update(*cold.tick()[:2])
    assert verdict.decision == "hold" and verdict.gates["latency"]["state"] == "hold"
    assert "not judged (1 s of warm-up left)" in verdict.gates["latency"]["reason"]
    assert judge.gates["latency"].baseline is None  # nor counted into stable's baseline
    resumed = Judge.from_dict(json.loads(json.dumps(judge.to_dict())))  # a restarted controller keeps the age
    verdict, _, _ = _run(resumed, cold, 60)  # 20 ticks of stable baseline (2,000), then judged
    assert verdict.decision == "rollback" and verdict.gates["latency"]["state"] == "reject"
    assert resumed.age_s == float(resumed.ticks) and resumed.ticks > 30  # one second a tick, counted on
    # with no warm-up the same traffic is rolled back as soon as the baseline is in
    verdict, _, _ = _run(Judge(JudgeSettings(gates=("errors", "latency"), latency_warmup_s=0)),
                         _Traffic(3, share=0.5, slow=True), 30)
    assert verdict.decision == "rollback"


def test_missing_data_holds_and_says_why():
    judge = Judge(JudgeSettings(labels_expected=True))
    verdict = judge.update({}, {})
    assert verdict.decision == "hold" and all(g["state"] == "hold" for g in verdict.gates.values())
    assert "no labels yet" in verdict.reason and "baseline has 0 of 2000" in verdict.reason
    # plenty of requests, no latency, outputs nor labels: errors may pass, the judge must hold
    for _ in range(100):
        verdict = judge.update({"requests": 190}, {"requests": 10})
    assert verdict.decision == "hold" and verdict.gates["errors"]["state"] == "pass"
    assert {g for g, e in verdict.gates.items() if e["state"] == "hold"} == {"latency", "outputs", "accuracy"}
    # only the candidate's side: nothing to compare with, nothing moves (even with every request failing)
    before = judge.to_dict()
    verdict = judge.update({}, {"requests": 50, "errors": 50})
    assert verdict.decision == "hold"
    assert judge.to_dict()["gates"]["errors"]["test"] == before["gates"]["errors"]["test"]
    assert verdict.stage_age_s == 102.0


def test_new_stage_resets_the_stage_evidence_but_not_the_tests():
    judge = Judge(JudgeSettings(gates=("errors",)))
    traffic = _Traffic(3)
    for _ in range(40):
        stable, candidate, _ = traffic.tick()
        verdict = judge.update(stable, candidate)
    assert verdict.decision == "pass"
    statistic = verdict.gates["errors"]["statistic"]
    judge.new_stage()
    verdict = judge.verdict()
    assert verdict.decision == "hold" and verdict.stage == 1 and verdict.stage_age_s == 0
    assert verdict.gates["errors"]["statistic"] == statistic and verdict.gates["errors"]["n"] == 0


def test_json_resume_gives_the_same_verdicts():
    settings = JudgeSettings(labels_expected=True)
    judge, traffic = Judge(settings), _Traffic(21)
    _run(judge, traffic, 120)
    resumed = Judge.from_dict(json.loads(json.dumps(judge.to_dict())))
    assert resumed.to_dict() == judge.to_dict()
    traffic.slow = True  # a regression after the restart: both must decide the same, tick by tick
    for _ in range(300):
        stable, candidate, paired = traffic.tick()
        a, b = judge.update(stable, candidate, paired), resumed.update(stable, candidate, paired)
        assert a.to_dict() == b.to_dict()
        if a.decision == "rollback":
            break
    assert a.decision == "rollback"


def test_replay_reproduces_every_verdict():
    settings = JudgeSettings(labels_expected=True, false_rollback_rate=0.01)
    record: list = []
    judge, traffic = Judge(settings), _Traffic(33, outputs_changed=0.05)
    verdicts = []
    for _ in range(600):
        stable, candidate, paired = traffic.tick()
        verdicts.append(judge.update(stable, candidate, paired).to_dict())
        record.append({"stable": stable, "candidate": candidate, "paired": paired})
        if verdicts[-1]["decision"] == "pass":
            judge.new_stage()
            record.append({"new_stage": True})
        if verdicts[-1]["decision"] == "rollback":
            break
    ticks = json.loads(json.dumps(record))
    assert [v.to_dict() for v in replay(settings.to_dict(), ticks)] == verdicts
    assert {v["decision"] for v in verdicts} == {"hold", "pass", "rollback"}


def test_settings_round_trip_and_bonferroni_split():
    settings = JudgeSettings(false_rollback_rate=0.003, gates=["latency", "errors", "accuracy"])
    assert settings.gates == ("errors", "latency", "accuracy") and settings.active_gates == ("errors", "latency")
    assert settings.gate_alphas == pytest.approx({"errors": 0.0015, "latency": 0.0015})
    assert JudgeSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    verdict = Judge(settings).update({"requests": 10}, {"requests": 1})
    assert set(verdict.gates) == {"errors", "latency"}
    labelled = JudgeSettings(labels_expected=True)  # accuracy weighs 6 against 1 for each other gate
    assert labelled.gate_alphas == pytest.approx({"errors": 0.002 / 9, "latency": 0.002 / 9, "outputs": 0.002 / 9,
                                                  "accuracy": 0.002 * 6 / 9})
    assert {g: gate.alpha for g, gate in Judge(labelled).gates.items()} == pytest.approx(labelled.gate_alphas)
    assert verdict.gates["errors"]["threshold"] == pytest.approx(math.log(2 / 0.003))


@pytest.mark.parametrize("field, value", [("false_rollback_rate", 0.7), ("false_rollback_rate", 0),
                                          ("min_stage_requests", 0), ("min_stage_labels", 2.5),
                                          ("labels_expected", "yes"), ("gates", ("errors", "speed")),
                                          ("accuracy_weight", 0), ("accuracy_weight", float("inf")),
                                          ("latency_warmup_s", -1.0),
                                          ("gates", ())])
def test_bad_settings_are_refused_naming_the_value(field, value):
    with pytest.raises(ValueError, match=field):
        JudgeSettings(**{field: value})
    with pytest.raises(ValueError, match="colour"):
        JudgeSettings.from_dict({"colour": 1})


@pytest.mark.parametrize("stable, candidate, paired, match", [
    ({"requests": 5, "errors": 6}, {}, None, "stable.errors"),
    ({}, {"requests": -1}, None, "candidate.requests"),
    ({"latency": [1, 2, 3]}, {}, None, "stable.latency"),
    ({"scores": [1] * 20}, {"scores": [1] * 10}, None, "differ in length"),
    ({"labelled": 3, "wrong": 4}, {}, None, "stable.wrong"),
    ({}, {}, {"pairs": 2, "stable_only_right": 2, "candidate_only_right": 1}, "paired"),
])
def test_malformed_ticks_are_refused(stable, candidate, paired, match):
    with pytest.raises(ValueError, match=match):
        Judge(JudgeSettings()).update(stable, candidate, paired)
