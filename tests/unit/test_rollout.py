"""The rollout's state, settings, routing, evidence and controller, on a real repository folder (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.errors import InvalidInput, RepositoryError
from serving.model_config import TensorSpec, make_config
from serving.registry import ModelRepository, ServingState
from serving.rollout.config import RolloutConfig, rollout_config
from serving.rollout.controller import RolloutController
from serving.rollout.evidence import BINARY_SCORE_BINS, RolloutEvidence, compare, score_bins
from serving.rollout.judge import LATENCY_EDGES_S
from serving.rollout.replay import replay_file, tick_files
from serving.rollout.routing import key_point, routing_key, to_candidate
from serving.rollout.state import RolloutState, read_rollout

FAST = {"fleet.rollout.stages": "5,50,100", "fleet.rollout.min_stage_requests": "50",
        "fleet.rollout.baseline_requests": "300"}


def _repo(tmp_path, **parameters) -> ModelRepository:
    repo = ModelRepository(str(tmp_path / "repo"))
    config = make_config("m", [TensorSpec("x", "FP32", (1,))], [TensorSpec("p", "FP32", (1,))], max_batch_size=8,
                         parameters={**FAST, **parameters})
    repo.publish("m", {"model.pt": b"v1"}, {"gate": "accepted"}, config=config)
    return repo


def _controller(tmp_path, repo, now):
    return RolloutController({"repository": repo.root_uri, "data_dir": str(tmp_path / "data")}, clock=lambda: now[0])


def _scan(controller) -> None:
    """A tick that reads the repository now (the controller reads it every few seconds)."""
    controller._scanned_at = -1e9
    controller.tick()


def _with_candidate(tmp_path):
    """(repo, clock, controller) with version 1 stable and version 2 just published and started."""
    repo, now = _repo(tmp_path), [1000.0]
    controller = _controller(tmp_path, repo, now)
    controller.tick()
    repo.publish("m", {"model.pt": b"v2"}, {"gate": "accepted"})
    _scan(controller)
    return repo, now, controller


def _tick(controller, stable: dict, candidate: dict, model: str = "m", s: int = 1, c: int = 2) -> None:
    controller.intake({model: {str(s): stable, str(c): candidate}})


def _healthy(n: int, rng: np.random.Generator) -> dict:
    latency = np.zeros(len(LATENCY_EDGES_S) + 1, np.int64)
    np.add.at(latency, np.searchsorted(LATENCY_EDGES_S, rng.lognormal(np.log(0.004), 0.3, n), side="right"), 1)
    scores = np.bincount(rng.integers(0, BINARY_SCORE_BINS, n), minlength=BINARY_SCORE_BINS)
    return {"requests": n, "errors": 0, "latency": latency.tolist(), "scores": scores.tolist()}


# -- settings ----------------------------------------------------------------------------------------------
def test_rollout_settings_are_read_and_bad_ones_named():
    config = RolloutConfig.from_parameters({"fleet.rollout": "shadow", **FAST})
    assert config.mode == "shadow" and config.stages == (5.0, 50.0, 100.0) and config.min_stage_requests == 50
    for params, named in (({"fleet.rollout": "blue-green"}, "fleet.rollout"),
                          ({"fleet.rollout.stages": "5,1,100"}, "stages"),
                          ({"fleet.rollout.stages": "5,50"}, "stages"),
                          ({"fleet.rollout.false_rollback_rate": "0"}, "false_rollback_rate"),
                          ({"fleet.rollout.accuracy_weight": "-1"}, "accuracy_weight"),
                          ({"fleet.rollout.min_stage_requests": "many"}, "min_stage_requests"),
                          ({"fleet.rollout.stage": "5"}, "unknown rollout parameter")):
        with pytest.raises(RepositoryError, match=named):
            RolloutConfig.from_parameters(params)


def test_only_a_one_version_policy_in_canary_or_shadow_mode_rolls_out(tmp_path):
    repo = _repo(tmp_path)
    assert rollout_config(repo.spec("m")) is not None
    immediate = _repo(tmp_path / "i", **{"fleet.rollout": "immediate"})
    assert rollout_config(immediate.spec("m")) is None


# -- state and the served set ------------------------------------------------------------------------------
def test_the_state_round_trips_and_picks_the_served_versions(tmp_path):
    repo = _repo(tmp_path)
    spec = repo.spec("m")
    state = RolloutState("m", stable=3, candidate=4, status="canary", weight=0.05, rolled_back=(2,))
    again = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state and again.route.weight == 0.05 and again.served() == [3, 4]
    assert ServingState().select(spec, [1, 2, 3, 4], state) == [3, 4]
    idle = state.evolve(status="idle", candidate=None)
    assert idle.epoch == state.epoch + 1 and idle.served() == [3]
    assert ServingState().select(spec, [1, 2, 3, 4, 5], idle) == [3]  # a newer version waits for the controller
    assert ServingState().select(spec, [1, 2], idle) == [1]  # stable deleted: the newest never rolled back
    assert ServingState(versions=(1,)).select(spec, [1, 2, 3], state) == [1]  # an administrator's pin wins
    with pytest.raises(RepositoryError, match="status"):
        RolloutState.from_dict({"model": "m", "status": "launching"})


# -- routing ------------------------------------------------------------------------------------------------
def test_routing_is_sticky_monotone_in_the_weight_and_uniform():
    keys = [f"user-{i}" for i in range(20_000)]
    at5 = {k for k in keys if to_candidate(k, 0.05)}
    at20 = {k for k in keys if to_candidate(k, 0.20)}
    assert at5 <= at20  # raising the weight only moves keys toward the candidate
    assert at5 == {k for k in keys if to_candidate(k, 0.05)}  # the same answer every time
    assert abs(len(at5) / len(keys) - 0.05) < 0.005 and abs(len(at20) / len(keys) - 0.20) < 0.01
    assert not any(to_candidate(k, 0.0) for k in keys[:100]) and all(to_candidate(k, 1.0) for k in keys[:100])
    assert 0.0 <= key_point("x") < 1.0
    assert routing_key({"routing_key": "p"}, "h", "k", "r") == "p"
    assert routing_key({}, "h", "k", "r") == "h" and routing_key({}, None, "k", "r") == "k"
    assert routing_key({}, None, None, "r") == "r" and routing_key({}, None, None, None) is None


# -- evidence ------------------------------------------------------------------------------------------------
def test_evidence_counts_and_hands_back_what_did_not_reach_the_controller():
    ev = RolloutEvidence()
    ev.success("m", 2, 0.004, np.array([[0.1], [0.97]], np.float32))
    ev.failure("m", 2)
    ev.shadow_pair("m", np.array([[0.2], [0.8]]), np.array([[0.3], [0.4]]))
    ev.shadow_pair("m", np.array([[0.2]]), None)
    delta = ev.take()
    d = delta["m"]["2"]
    assert d["requests"] == 2 and d["errors"] == 1 and sum(d["latency"]) == 1
    assert d["scores"][2] == 1 and d["scores"][19] == 1 and sum(d["scores"]) == 2
    sh = delta["m"]["shadow"]
    assert sh["pairs"] == 2 and sh["rows"] == 2 and sh["disagree"] == 1 and sh["candidate_only_failed"] == 1
    assert sh["max_abs_diff"] == pytest.approx(0.4) and sh["score_delta_sum"] == pytest.approx(-0.3)
    assert ev.take() == {}
    ev.give_back(delta)
    assert ev.take() == json.loads(json.dumps(delta))
    assert compare(np.array([[0.1, 0.9]]), np.array([[0.8, 0.2]]))[:2] == (1, 1)
    assert score_bins(np.array([[0.1, 0.5, 0.4]])).tolist() == [0, 1, 0]


def test_outputs_binned_in_bulk_count_exactly_as_one_by_one():
    rng = np.random.default_rng(3)
    outputs = [rng.random((int(rng.integers(1, 9)), 1), dtype=np.float32) for _ in range(2500)]
    outputs[7][0, 0] = np.nan  # counted in the first bin, as one by one
    ev = RolloutEvidence()
    for out in outputs:
        ev.success("m", 1, 0.001, out)
    ev.success("m", 1, 0.001, None)  # a request without the output (not returned): counted, not binned
    d = ev.take()["m"]["1"]
    assert d["requests"] == 2501 and d["scores"] == sum(score_bins(o) for o in outputs).tolist()
    ev = RolloutEvidence()  # shadow pairs compared in bulk: the same figures as pair by pair
    pairs = [(rng.random((int(rng.integers(1, 5)), 1)), rng.random((0, 1))) for _ in range(1500)]
    pairs = [(st, np.clip(st + rng.normal(0, 0.2, st.shape), 0, 1)) for st, _ in pairs] + [(np.ones((2, 1)), np.ones(3))]
    for st, ca in pairs:
        ev.shadow_pair("m", st, ca)
    sh = ev.take()["m"]["shadow"]
    one_by_one = [compare(st, ca) for st, ca in pairs]
    assert sh["pairs"] == 1501 and sh["rows"] == sum(x[0] for x in one_by_one)
    assert sh["disagree"] == sum(x[1] for x in one_by_one) and sh["max_abs_diff"] == float("inf")
    assert sh["score_delta_sum"] == pytest.approx(sum(x[3] for x in one_by_one))
    assert sh["candidate_scores"] == sum(score_bins(ca) for _, ca in pairs).tolist()
    classes = [rng.random((3, 4)) for _ in range(10)]
    for out in classes:
        ev.success("m", 1, 0.001, out)
    assert ev.take()["m"]["1"]["scores"] == sum(score_bins(o) for o in classes).tolist()


# -- the controller --------------------------------------------------------------------------------------------
def test_a_new_version_becomes_the_candidate_and_a_crashing_one_is_rolled_back(tmp_path):
    repo, now = _repo(tmp_path), [1000.0]
    controller = _controller(tmp_path, repo, now)
    controller.tick()
    assert read_rollout(repo, "m").stable == 1 and controller.routes()["m"]["candidate"] is None
    repo.publish("m", {"model.pt": b"v2"}, {"gate": "accepted"})
    _scan(controller)
    state = read_rollout(repo, "m")
    assert state.status == "canary" and state.candidate == 2 and state.weight == 0.05
    rng = np.random.default_rng(1)
    for _ in range(10):
        _tick(controller, _healthy(19, rng), {"requests": 1, "errors": 1})
        if read_rollout(repo, "m").status == "idle":
            break
    state = read_rollout(repo, "m")
    assert state.status == "idle" and state.rolled_back == (2,) and controller.routes()["m"]["weight"] == 0.0
    assert repo.metadata("m", 2)["rollout"]["outcome"] == "rolled_back"
    result = replay_file(tick_files(str(tmp_path / "data"), "m")[-1])
    assert result["mismatches"] == [] and result["decisions"][-1]["replayed"] == "rollback"
    _scan(controller)  # never started again by the automation
    assert read_rollout(repo, "m").status == "idle"


def test_a_good_candidate_passes_its_stages_and_a_restarted_controller_resumes(tmp_path):
    repo, now, controller = _with_candidate(tmp_path)
    rng = np.random.default_rng(2)
    for _ in range(40):  # stage 0 (5 %): not yet 50 candidate requests
        _tick(controller, _healthy(19, rng), _healthy(1, rng))
    controller.tick()  # saved (the judge's state with it) at least every few seconds; here: forced
    now[0] += 10
    controller._write(controller.models["m"], controller.models["m"].state.evolve(
        judge=controller.models["m"].judge.to_dict()))
    # A new controller (the monitor restarted) resumes from rollout.json.
    controller = _controller(tmp_path, repo, now)
    controller.tick()
    state = read_rollout(repo, "m")
    assert state.status == "canary" and state.candidate == 2 and state.stage == 0
    for _ in range(400):
        m = controller.models["m"].state
        if m.status == "idle":
            break
        share = m.weight
        n = 40
        _tick(controller, _healthy(round(n * (1 - share)), rng), _healthy(round(n * share), rng))
    state = read_rollout(repo, "m")
    assert state.status == "idle" and state.stable == 2 and state.rolled_back == ()
    assert [h["event"] for h in state.history] == ["stable", "start", "stage", "promote"]
    assert repo.metadata("m", 2)["rollout"]["outcome"] == "promoted"


def test_administrator_actions_are_checked(tmp_path):
    repo, now = _repo(tmp_path), [1000.0]
    controller = _controller(tmp_path, repo, now)
    controller.tick()
    with pytest.raises(InvalidInput, match="no rollout in progress"):
        controller.action("m", "promote")
    with pytest.raises(InvalidInput, match="no version newer"):
        controller.action("m", "start")
    with pytest.raises(InvalidInput, match="unknown rollout action"):
        controller.action("m", "launch")
    repo.publish("m", {"model.pt": b"v2"}, {"gate": "accepted"})
    doc = controller.action("m", "start", 2, mode="ab", split=0.25)
    assert doc["status"] == "ab" and doc["weight"] == 0.25
    with pytest.raises(InvalidInput, match="only a canary pauses"):
        controller.action("m", "pause")
    doc = controller.action("m", "abort")
    assert doc["status"] == "idle" and doc["rolled_back"] == [2] and doc["stable"] == 1
    repo.publish("m", {"model.pt": b"v3"}, {"gate": "accepted"})
    doc = controller.action("m", "start", 3)
    assert doc["status"] == "canary" and doc["candidate"] == 3
    assert controller.action("m", "promote")["stable"] == 3


def test_a_sample_ratio_mismatch_raises_the_ab_alarm(tmp_path):
    repo, now = _repo(tmp_path), [1000.0]
    controller = _controller(tmp_path, repo, now)
    controller.tick()
    repo.publish("m", {"model.pt": b"v2"}, {"gate": "accepted"})
    controller.action("m", "start", 2, mode="ab", split=0.5)
    for _ in range(20):
        _tick(controller, {"requests": 50}, {"requests": 50})
    assert controller.status("m")["alarm"] is None
    for _ in range(20):
        _tick(controller, {"requests": 60}, {"requests": 40})
    doc = controller.status("m")
    assert doc["alarm"] and "sample ratio mismatch" in doc["alarm"] and doc["sample_ratio"]["mismatch"]
    assert doc["arms"]["2"]["requests"] == 1800 and doc["arms"]["1"]["requests"] == 2200


def test_a_newer_version_supersedes_the_candidate_and_an_older_one_does_not(tmp_path):
    repo, now, controller = _with_candidate(tmp_path)
    controller.action("m", "promote")
    assert controller.action("m", "start", 1, mode="ab", split=0.3)["candidate"] == 1  # the older one, by hand
    _scan(controller)
    assert read_rollout(repo, "m").status == "ab"  # version 2 (stable) does not supersede it
    controller.action("m", "abort")
    repo.publish("m", {"model.pt": b"v3"}, {"gate": "accepted"})
    _scan(controller)
    repo.publish("m", {"model.pt": b"v4"}, {"gate": "accepted"})
    _scan(controller)
    state = read_rollout(repo, "m")
    assert state.candidate == 4 and state.status == "canary" and state.rolled_back == (1,)
    assert [h["event"] for h in state.history][-3:] == ["start", "supersede", "start"]
    assert repo.metadata("m", 3)["rollout"]["outcome"] == "superseded"


def test_a_candidate_whose_inputs_drift_is_held_not_promoted(tmp_path):
    repo, now = _repo(tmp_path), [1000.0]
    drifting = {"m": ["amount"]}
    controller = RolloutController({"repository": repo.root_uri, "data_dir": None}, clock=lambda: now[0],
                                   input_alarms=lambda model, version: drifting.get(model, []) if version == 2 else [])
    controller.tick()
    repo.publish("m", {"model.pt": b"v2"}, {"gate": "accepted"})
    _scan(controller)
    rng = np.random.default_rng(3)
    for _ in range(200):
        _tick(controller, _healthy(38, rng), _healthy(2, rng))
    state = controller.models["m"].state
    assert state.status == "canary" and state.stage == 0
    assert state.evidence["decision"] == "hold" and "input drift" in state.evidence["reason"]
    drifting.clear()  # the alarm clears: the stage passes on the evidence it has
    _tick(controller, _healthy(38, rng), _healthy(2, rng))
    assert controller.models["m"].state.stage == 1


def test_with_labels_the_accuracy_gate_replaces_the_outputs_gate_unless_told_otherwise():
    from serving.rollout.controller import judge_settings

    plain = judge_settings(RolloutConfig.from_parameters({}))
    assert plain.active_gates == ("errors", "latency", "outputs")
    labelled = judge_settings(RolloutConfig.from_parameters({"fleet.rollout.labels": "true"}))
    assert labelled.active_gates == ("errors", "latency", "accuracy")
    chosen = judge_settings(RolloutConfig.from_parameters({"fleet.rollout.labels": "true",
                                                          "fleet.rollout.gates": "errors,outputs,accuracy"}))
    assert chosen.active_gates == ("errors", "outputs", "accuracy")
    assert labelled.gate_alphas["accuracy"] == pytest.approx(0.002 * 6 / 8)  # the weight, from the config
    even = judge_settings(RolloutConfig.from_parameters({"fleet.rollout.labels": "true",
                                                        "fleet.rollout.accuracy_weight": "1"}))
    assert even.gate_alphas == pytest.approx({"errors": 0.002 / 3, "latency": 0.002 / 3, "accuracy": 0.002 / 3})
    for bad in ("errors,errors", "errors,speed", "accuracy"):
        with pytest.raises(RepositoryError, match="fleet.rollout.gates"):
            RolloutConfig.from_parameters({"fleet.rollout.gates": bad})
