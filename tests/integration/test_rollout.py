"""Progressive delivery on a live cluster: candidates published into the repository roll out by stages.

A crashing candidate is rolled back after a handful of its requests and no client sees its error
(each failed request is answered by the stable version); a good one reaches all the traffic stage by
stage, its routing keys sticky, steered by an administrator (anonymous callers refused); a killed
controller resumes from rollout.json; a shadow candidate never answers a client and one that
changes its outputs is rolled back from the shadow stage; an A/B experiment keeps its split.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import ray

from benchmarks.rollout_faults import ChangeOutputs, Crash, wrap
from integration._monitoring import metric_value, read_log, wait_until
from integration._rollout import ADMIN, ROWS, act, rollout, traffic, wait_rollout
from serving.monitor import MONITOR_NAME, MONITOR_NAMESPACE
from serving.rollout.replay import replay_file, tick_files
from serving.rollout.routing import key_point

pytestmark = pytest.mark.integration


def _publish(repo, model: str, fault=None, *args) -> int:
    model_file = Path(repo.version(model, 1).path, "model.pt").read_bytes()
    return repo.publish(model, {"model.pt": wrap(model_file, fault, *args)},
                        {**repo.metadata(model, 1), "gate": "accepted", "parent": 1})


def _audit(data_dir: str, model: str) -> list[dict]:
    lines = (Path(data_dir) / "audit" / "rollout.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["model"] == model]


def _served_everywhere(base_url: str, model: str, version: int) -> bool:
    """`version` answers on fresh connections (the kernel spreads them over both ingress replicas)."""
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    return all(httpx.post(f"{base_url}/v2/models/{model}/versions/{version}/infer", json=body,
                          timeout=10).status_code == 200 for _ in range(12))


def test_a_crashing_candidate_is_rolled_back_within_20_of_its_requests_and_no_client_sees_an_error(
        fleet_cluster, base_url, repository_models):
    model, data_dir = "fraud_canary", fleet_cluster[0].data_dir
    assert _publish(repository_models, model, Crash) == 2
    wait_rollout(base_url, model, lambda s: s["status"] == "canary" and s["candidate"] == 2, 30, "the canary")
    answers: list[dict] = []

    def load() -> None:
        answers.extend(traffic(base_url, model, [f"crash-{len(answers) + i}" for i in range(200)]))

    state = wait_rollout(base_url, model, lambda s: s["status"] == "idle" and s["rolled_back"] == [2], 60,
                         "the rollback", load=load)
    assert answers and all(a["status"] == 200 and a["version"] == "1" for a in answers), \
        [a for a in answers if a["status"] != 200 or a["version"] != "1"][:3]
    assert state["stable"] == 1 and state["candidate"] is None and state["weight"] == 0.0
    assert [h["event"] for h in state["history"]][-2:] == ["start", "rollback"]
    record = [r for r in _audit(data_dir, model) if r["event"] == "rollback"][-1]
    errors = record["evidence"]["gates"]["errors"]
    assert errors["state"] == "reject" and errors["statistic"] >= errors["threshold"]
    assert errors["n"] <= 20, errors  # candidate requests judged when it was rolled back
    assert repository_models.metadata(model, 2)["rollout"]["outcome"] == "rolled_back"
    metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert metric_value(metrics, "fleet_rollout_decisions_total", model=model, decision="rollback") == 1.0
    assert metric_value(metrics, "fleet_rollout_weight", model=model, version="1") == 1.0
    assert metric_value(metrics, "fleet_rollout_weight", model=model, version="2") is None
    # Never served again: the replicas drop it at their next poll, and no request reaches it.
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.0] * 30}]}
    wait_until(lambda: httpx.post(f"{base_url}/v2/models/{model}/versions/2/infer", json=body,
                                  timeout=10).status_code == 404, 15, what="version 2 unloaded")
    assert all(a["status"] == 200 and a["version"] == "1" for a in traffic(base_url, model, [f"after-{i}"
                                                                                          for i in range(200)]))
    # The recorded judge ticks replay to the same decisions.
    result = replay_file(tick_files(data_dir, model)[-1])
    assert result["mismatches"] == [] and [d["replayed"] for d in result["decisions"]] == ["rollback"]


def test_a_good_candidate_reaches_all_traffic_stage_by_stage_with_sticky_keys(fleet_cluster, base_url,
                                                                             repository_models):
    model = "fraud_canary_aa"
    assert _publish(repository_models, model) == 2  # an identical copy: A/A
    wait_rollout(base_url, model, lambda s: s["status"] == "canary" and s["candidate"] == 2, 30, "the canary")
    # Anonymous callers and wrong tokens are refused; the state is unchanged.
    for headers in (None, {"authorization": "Bearer wrong"}):
        assert act(base_url, model, "pause", headers=headers).status_code == 401
        assert httpx.get(f"{base_url}/v2/models/{model}/rollout", headers=headers, timeout=10).status_code == 401
    assert rollout(base_url, model)["status"] == "canary"
    r = act(base_url, model, "pause")
    assert r.status_code == 200 and r.json()["status"] == "paused" and r.json()["weight"] == 0.05, r.text
    assert act(base_url, model, "start", {"version": 2}).status_code == 400  # one rollout at a time
    wait_until(lambda: _served_everywhere(base_url, model, 2), 20, what="version 2 loaded by every replica")
    # At 5 % a routing key goes to the candidate exactly when its hash falls under 0.05, every time.
    keys = [f"user-{i}" for i in range(600)]
    first = traffic(base_url, model, keys, by_header=True)
    second = traffic(base_url, model, keys, by_header=True)
    for a, b in zip(first, second):
        expected = "2" if key_point(a["name"]) < 0.05 else "1"
        assert a["status"] == b["status"] == 200 and a["version"] == b["version"] == expected, (a, b)
    assert 10 <= sum(a["version"] == "2" for a in first) <= 55
    assert act(base_url, model, "resume").json()["status"] == "canary"
    answers: list[dict] = []

    def load() -> None:
        answers.extend(traffic(base_url, model, [f"aa-{len(answers) + i}" for i in range(300)]))

    state = wait_rollout(base_url, model, lambda s: s["status"] == "idle" and s["stable"] == 2, 180,
                         "the promotion", load=load)
    assert all(a["status"] == 200 for a in answers)
    events = [h for h in state["history"] if h["event"] in ("start", "pause", "resume", "stage", "promote")]
    assert [e["event"] for e in events][-5:] == ["start", "pause", "resume", "stage", "promote"]
    assert [e["weight"] for e in events if e["event"] == "stage"][-1] == 0.5
    assert repository_models.metadata(model, 2)["rollout"]["outcome"] == "promoted"
    wait_until(lambda: all(a["version"] == "2" for a in traffic(base_url, model, [f"p-{i}" for i in range(50)])),
               10, what="every request answered by the promoted version")

    # An A/B experiment against the old version: a fixed split by routing key, each arm reported.
    r = act(base_url, model, "start", {"version": 1, "mode": "ab", "split": 0.3})
    assert r.status_code == 200 and r.json()["status"] == "ab" and r.json()["weight"] == 0.3, r.text
    assert act(base_url, model, "start", {"mode": "ab"}).status_code == 400
    wait_until(lambda: _served_everywhere(base_url, model, 1), 20, what="version 1 loaded again")
    ab = traffic(base_url, model, [f"ab-{i}" for i in range(1500)])
    assert all(a["status"] == 200 for a in ab)
    share = sum(a["version"] == "1" for a in ab) / len(ab)
    assert abs(share - 0.3) < 0.05, share
    doc = wait_rollout(base_url, model, lambda s: s["arms"]["1"]["requests"] >= 400, 10, "the arms' counts")
    assert doc["sample_ratio"]["mismatch"] is False and doc["alarm"] is None
    assert doc["arms"]["1"]["errors"] == doc["arms"]["2"]["errors"] == 0
    assert doc["arms"]["1"]["latency_upper_bound"]["p50_ms"] > 0
    assert act(base_url, model, "abort").json()["stable"] == 2


def test_a_killed_controller_resumes_the_rollout_from_rollout_json(fleet_cluster, base_url, repository_models):
    model = "fraud_canary_kill"
    assert _publish(repository_models, model) == 2
    wait_rollout(base_url, model, lambda s: s["status"] == "canary" and s["candidate"] == 2, 30, "the canary")
    traffic(base_url, model, [f"k-{i}" for i in range(300)])  # some evidence, not a stage's worth
    before = rollout(base_url, model)
    ray.kill(ray.get_actor(MONITOR_NAME, namespace=MONITOR_NAMESPACE), no_restart=False)
    # Meanwhile every replica routes as it did, and answers.
    answers = traffic(base_url, model, [f"k2-{i}" for i in range(300)])
    assert all(a["status"] == 200 and a["version"] in ("1", "2") for a in answers)

    def back(s: dict) -> bool:
        return s["rollout_id"] == before["rollout_id"]

    after = wait_until(lambda: _maybe_rollout(base_url, model), 60, what="the controller back")
    assert back(after) and after["status"] == "canary" and after["candidate"] == 2 and after["stage"] == 0
    assert after["epoch"] >= before["epoch"]
    answers = []

    def load() -> None:
        answers.extend(traffic(base_url, model, [f"k3-{len(answers) + i}" for i in range(300)]))

    state = wait_rollout(base_url, model, lambda s: s["status"] == "idle" and s["stable"] == 2, 180,
                         "the promotion after the restart", load=load)
    assert all(a["status"] == 200 for a in answers)
    assert [h["event"] for h in state["history"]].count("start") == 1  # resumed, not started again


def _maybe_rollout(base_url: str, model: str) -> dict | None:
    r = httpx.get(f"{base_url}/v2/models/{model}/rollout", headers=ADMIN, timeout=30)
    return r.json() if r.status_code == 200 else None


def test_a_shadow_candidate_never_answers_and_one_that_changes_outputs_is_rolled_back(fleet_cluster, base_url,
                                                                                      repository_models):
    model, data_dir = "fraud_shadow", fleet_cluster[0].data_dir
    assert _publish(repository_models, model, ChangeOutputs, 0.5) == 2
    wait_rollout(base_url, model, lambda s: s["status"] == "shadow" and s["candidate"] == 2, 30, "the shadow")
    # What version 1 answers for each row, asked by its URL (128 rows a request: under max_batch_rows).
    expected = []
    for start in range(0, len(ROWS), 128):
        part = ROWS[start:start + 128]
        body = {"inputs": [{"name": "features", "shape": list(part.shape), "datatype": "FP32",
                            "data": part.ravel().tolist()}]}
        r = httpx.post(f"{base_url}/v2/models/{model}/versions/1/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        expected += r.json()["outputs"][0]["data"]
    answers: list[dict] = []

    def load() -> None:
        answers.extend(traffic(base_url, model, [f"sh-{len(answers) + i}" for i in range(300)]))

    state = wait_rollout(base_url, model, lambda s: s["status"] == "idle" and s["rolled_back"] == [2], 90,
                         "the rollback from the shadow stage", load=load)
    leaked = [a for a in answers if a["status"] != 200 or a["version"] != "1"
              or abs(a["output"] - expected[a["row"]]) > 1e-6]
    assert not leaked, leaked[:3]
    assert [h["event"] for h in state["history"]][-2:] == ["start", "rollback"]
    record = [r for r in _audit(data_dir, model) if r["event"] == "rollback"][-1]
    assert record["evidence"]["gates"]["outputs"]["state"] == "reject", record["evidence"]
    shadow = record["shadow"]
    assert shadow["pairs"] > 0 and shadow["decisions_differ"] > 0 and shadow["max_abs_diff"] > 0.1
    # Each copy is in the prediction log under version 2, answered_by "shadow of 1", beside the client's row.
    log = wait_until(lambda: (t := read_log(data_dir, model, ["request_id", "version", "answered_by"])).num_rows
                     and "shadow of 1" in t["answered_by"].to_pylist() and t, 15, what="shadow rows in the log")
    rows = log.to_pylist()
    shadowed = {r["request_id"] for r in rows if r["answered_by"] == "shadow of 1"}
    assert all(r["version"] == 2 for r in rows if r["answered_by"] == "shadow of 1")
    answered = {r["request_id"] for r in rows if r["answered_by"] == "model"}
    assert shadowed and shadowed <= answered
