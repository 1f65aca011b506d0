"""Live version pickup without Ray: rejected versions are never served, a runner follows a repository on disk.

Every model here answers `scale * (x[:, :2] + x[:, 2:])` with its version number
as the scale, so an answer says which version computed it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
import pytest

from serving.errors import ModelNotFound, ModelUnavailable
from serving.model_config import TensorSpec, make_config
from serving.options import ServingOptions
from serving.registry import ModelRepository
from serving.service import InferenceService
from serving.workers import LocalWorkerClient, ModelRunner
from _scaled import model_bytes

MODEL = "m"
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def config(latest: int = 1, max_batch_size: int = 8, policy: str | None = None):
    cfg = make_config(MODEL, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))],
                      max_batch_size=max_batch_size, latest_versions=latest,
                      parameters={"fleet.max_inflight_batches": "1"})
    if policy == "all":
        cfg.version_policy.all.SetInParent()
    elif policy is not None:
        cfg.version_policy.specific.versions.extend(int(v) for v in policy.split(","))
    return cfg


def publish(repo: ModelRepository, version: int, *, gate: str | None = None, data: bytes | None = None,
            work: int = 0, cfg=None) -> int:
    metadata = {} if gate is None else {"gate": gate}
    return repo.publish(MODEL, {"model.pt": data if data is not None else model_bytes(float(version), work)},
                        metadata, config=cfg, version=version)


def answers(out: dict) -> float:
    """The scale the answering version applied."""
    return float(out["y"][0, 0] / (X[0, 0] + X[0, 2]))


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(str(tmp_path / "repo"))


# -- served_versions: rejected versions are never served -------------------------------------


@pytest.mark.parametrize(
    "latest, policy, served",
    [
        (1, None, [4]),  # the newest accepted one, not the rejected 5
        (2, None, [2, 4]),
        (3, None, [1, 2, 4]),
        (1, "all", [1, 2, 4]),
        (1, "2,3,5", [2]),
    ],
)
def test_served_versions_skip_rejected_versions_with_every_policy(repo, latest, policy, served):
    publish(repo, 1, cfg=config(latest, policy=policy))  # no gate at all: accepted, as in a Triton repository
    publish(repo, 2, gate="accepted")
    publish(repo, 3, gate="rejected")
    publish(repo, 4, gate="accepted")
    publish(repo, 5, gate="rejected")
    assert repo.list_versions(MODEL) == [1, 2, 3, 4, 5]
    assert repo.accepted_versions(MODEL) == [1, 2, 4]
    assert repo.served_versions(MODEL) == served


def test_a_verdict_is_read_once_and_unreadable_metadata_is_not_served(repo, tmp_path):
    publish(repo, 1, cfg=config(latest=3))
    publish(repo, 2, gate="accepted")
    publish(repo, 3)
    assert repo.served_versions(MODEL) == [1, 2, 3]
    # A version is immutable: its verdict is not read again on every poll.
    (tmp_path / "repo" / MODEL / "2" / "metadata.json").write_text(json.dumps({"gate": "rejected"}))
    assert repo.served_versions(MODEL) == [1, 2, 3]
    assert ModelRepository(str(tmp_path / "repo")).served_versions(MODEL) == [1, 3]  # a fresh reader sees it
    # Unreadable metadata might hide a rejection: the version is left out (and read again next time).
    (tmp_path / "repo" / MODEL / "3" / "metadata.json").write_text("{not json")
    fresh = ModelRepository(str(tmp_path / "repo"))
    assert fresh.served_versions(MODEL) == [1]
    (tmp_path / "repo" / MODEL / "3" / "metadata.json").write_text("{}")
    assert fresh.served_versions(MODEL) == [1, 3]


# -- the runner follows the repository ---------------------------------------------------


async def test_a_published_version_is_served_after_a_sync_and_the_old_one_retires_after_its_grace(repo, caplog):
    publish(repo, 1, cfg=config(latest=1))
    runner = await ModelRunner.load(repo.root_uri, MODEL, retire_grace_s=0.3)
    try:
        assert (await runner.status())["versions"] == [1]
        assert answers(await runner.infer(1, {"x": X})) == 1.0
        assert not await runner.versions.sync()  # nothing new: no switch

        publish(repo, 2)
        with caplog.at_level(logging.INFO, logger="fleet.versions"):
            assert await runner.versions.sync()
        switches = [r.getMessage() for r in caplog.records if r.name == "fleet.versions"]
        assert len(switches) == 1 and switches[0].startswith("model m: serving versions [1] -> [2] (loaded [2] in ")
        assert (await runner.status())["versions"] == [2]
        assert answers(await runner.infer(2, {"x": X})) == 2.0
        # Calls routed to version 1 before the switch (or by a stale ingress) still run on it, during the grace.
        assert answers(await runner.infer(1, {"x": X})) == 1.0
        assert (await runner.status())["loaded"] == [1, 2]
        await asyncio.sleep(0.6)
        assert (await runner.status())["loaded"] == [2]
        with pytest.raises(ModelNotFound, match="version 1 is not loaded"):
            await runner.infer(1, {"x": X})
    finally:
        await runner.close()


async def test_a_broken_or_rejected_version_is_skipped_and_the_old_one_keeps_serving(repo, caplog):
    publish(repo, 1, cfg=config(latest=1))
    runner = await ModelRunner.load(repo.root_uri, MODEL, retire_grace_s=0.1)
    try:
        publish(repo, 2, data=b"this is not TorchScript")
        with caplog.at_level(logging.ERROR, logger="fleet.versions"):
            assert not await runner.versions.sync()
        assert "version 2 failed to load" in caplog.text
        assert (await runner.status())["versions"] == [1]
        assert answers(await runner.infer(1, {"x": X})) == 1.0
        with pytest.raises(ModelNotFound):
            await runner.infer(2, {"x": X})  # asked for explicitly: refused, the model stays up

        publish(repo, 3, gate="rejected")
        assert not await runner.versions.sync()
        assert (await runner.status())["versions"] == [1]

        publish(repo, 4)  # a good one after them is picked up
        assert await runner.versions.sync()
        assert (await runner.status())["versions"] == [4]
        assert answers(await runner.infer(4, {"x": X})) == 4.0
    finally:
        await runner.close()


async def test_with_latest_two_a_broken_newest_version_keeps_the_two_before_it(repo):
    publish(repo, 1, cfg=config(latest=2))
    publish(repo, 2)
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    try:
        publish(repo, 3, data=b"\x00broken")
        assert not await runner.versions.sync()
        assert (await runner.status())["versions"] == [1, 2]
    finally:
        await runner.close()


async def test_a_model_whose_only_versions_are_broken_or_rejected_fails_to_load_saying_why(repo):
    publish(repo, 1, cfg=config(latest=1), data=b"broken")
    with pytest.raises(ModelUnavailable, match="version 1"):
        await ModelRunner.load(repo.root_uri, MODEL)
    other = ModelRepository(repo.root_uri.replace("repo", "other"))
    other.publish(MODEL, {"model.pt": model_bytes(1.0)}, {"gate": "rejected"}, config=config())
    with pytest.raises(ModelNotFound, match="no published, accepted version"):
        await ModelRunner.load(other.root_uri, MODEL)


async def test_a_call_for_a_version_not_loaded_yet_loads_it_on_demand(repo):
    publish(repo, 1, cfg=config(latest=1))
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    try:
        publish(repo, 2)  # this replica has not polled yet; the ingress heard of 2 from another replica
        assert answers(await runner.infer(2, {"x": X})) == 2.0
        assert (await runner.status())["versions"] == [2]
        with pytest.raises(ModelNotFound):
            await runner.infer(7, {"x": X})  # not in the repository: still refused
    finally:
        await runner.close()


async def test_polling_switches_by_itself_and_announces_it(repo):
    publish(repo, 1, cfg=config(latest=1))
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    switched = asyncio.Event()

    async def on_switch() -> None:
        switched.set()

    try:
        runner.start_polling(0.05, on_switch)
        await asyncio.sleep(0.2)
        assert not switched.is_set()
        publish(repo, 2)
        await asyncio.wait_for(switched.wait(), 5)
        assert (await runner.status())["versions"] == [2]
    finally:
        await runner.close()


async def test_a_poll_interval_of_zero_never_polls(repo):
    publish(repo, 1, cfg=config(latest=1))
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    try:
        runner.start_polling(0)
        publish(repo, 2)
        await asyncio.sleep(0.2)
        assert (await runner.status())["versions"] == [1]
    finally:
        await runner.close()


# -- the service routes to the new version; queued requests on the old one finish on it -------------


def _body(rows: int = 2) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                   "data": X[:rows].ravel().tolist()}]}).encode()


async def test_the_service_switches_its_default_version_and_drains_the_old_batcher(repo):
    # Version 1 is slow and takes one request per batch, so requests queue behind each other.
    publish(repo, 1, cfg=config(latest=1, max_batch_size=2), work=300)
    runner = await ModelRunner.load(repo.root_uri, MODEL, retire_grace_s=5.0)
    spec, cfg = repo.load_config(MODEL)
    options = ServingOptions(repository=repo.root_uri)
    service = InferenceService({MODEL: (spec, cfg, LocalWorkerClient(runner))}, options)
    runner.start_polling(0, lambda: service.refresh(models=(MODEL,)))
    try:
        await service.refresh()
        first = json.loads((await service.infer(MODEL, None, _body(), None))[0])
        assert first["model_version"] == "1"
        queued = [asyncio.create_task(service.infer(MODEL, None, _body(), None)) for _ in range(6)]
        await asyncio.sleep(0.01)
        old_batcher = service.models[MODEL].batchers[1]
        assert old_batcher.queue_depth > 0  # still waiting when the switch comes

        publish(repo, 2)
        assert await runner.versions.sync()  # announces the switch: the service refreshes at once
        assert service.models[MODEL].versions == [2]
        after = json.loads((await service.infer(MODEL, None, _body(), None))[0])
        assert after["model_version"] == "2"
        assert after["outputs"][0]["data"][0] == 2.0 * (X[0, 0] + X[0, 2])

        done = [json.loads(body) for body, *_ in await asyncio.gather(*queued)]  # none failed
        assert [d["model_version"] for d in done] == ["1"] * 6  # each names the version that answered
        assert all(d["outputs"][0]["data"][0] == X[0, 0] + X[0, 2] for d in done)
        assert 1 not in service.models[MODEL].batchers
        with pytest.raises(ModelNotFound, match="no version 1 being served"):
            await service.infer(MODEL, "1", _body(), None)
    finally:
        await service.close()
        await runner.close()


def _keyed_body(key: str) -> bytes:
    return json.dumps({"parameters": {"routing_key": key},
                       "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": X[:1].ravel().tolist()}]}).encode()


@pytest.fixture
def hops(monkeypatch) -> list:
    """The versions of each one-hop call to the model thread (`TorchScriptBackend.run_many`), in order."""
    from serving.backends.torchscript import TorchScriptBackend

    calls = []
    run_many = TorchScriptBackend.run_many

    async def counted(batches):
        calls.append([b.version for b, _ in batches])
        return await run_many(batches)

    monkeypatch.setattr(TorchScriptBackend, "run_many", staticmethod(counted))
    return calls


async def two_versions_served(repo) -> tuple[InferenceService, ModelRunner]:
    """Versions 1 and 2 published (batching, both loaded) and a service running them in this process."""
    publish(repo, 1, cfg=config(latest=2, max_batch_size=8))
    publish(repo, 2)
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    spec, cfg = repo.load_config(MODEL)
    service = InferenceService({MODEL: (spec, cfg, LocalWorkerClient(runner))}, ServingOptions(repository=repo.root_uri))
    await service.refresh()
    return service, runner


async def test_a_canary_runs_stable_and_candidate_on_one_queue_in_one_hop_and_each_answers_its_own(
        repo, monkeypatch, hops):
    from serving.rollout.routing import to_candidate
    from serving.rollout.state import Route

    monkeypatch.setattr("serving.workers._ONE_HOP_MAX_S", 1.0)  # however long a first call takes here
    service, runner = await two_versions_served(repo)
    try:
        assert service.apply_route(MODEL, Route(stable=1, candidate=2, weight=0.5, epoch=1))
        keys = [f"user-{i}" for i in range(64)]
        answers_ = [json.loads(body) for body, *_ in await asyncio.gather(
            *(service.infer(MODEL, None, _keyed_body(k), None) for k in keys))]
        for key, answer in zip(keys, answers_):  # each key on its side, computed by that version
            version = 2 if to_candidate(key, 0.5) else 1
            assert answer["model_version"] == str(version), key
            assert answer["outputs"][0]["data"][0] == version * (X[0, 0] + X[0, 2])
        assert {2 if to_candidate(k, 0.5) else 1 for k in keys} == {1, 2}
        (pair, joint), = service._joint.values()
        assert pair == (1, 2) and len(joint.lanes) == 2
        assert [1, 2] in hops  # a batch holding both versions' rows went to the model thread once
        # the canary ends: its queue is drained and closed, requests go to the stable version's own batcher again
        assert service.apply_route(MODEL, Route(stable=1, epoch=2))
        answer = json.loads((await service.infer(MODEL, None, _keyed_body(keys[0]), None))[0])
        assert answer["model_version"] == "1" and not service._joint
        await asyncio.sleep(0.05)
        assert joint._closed
    finally:
        await service.close()
        await runner.close()


async def test_shadow_copies_are_answered_by_stable_compared_in_pairs_and_shed_past_the_in_flight_limit(
        repo, monkeypatch):
    from serving.rollout.state import Route

    monkeypatch.setattr("serving.rollout.serving._SHADOW_MAX_INFLIGHT", 6)
    service, runner = await two_versions_served(repo)
    try:
        assert service.apply_route(MODEL, Route(stable=1, candidate=2, weight=0.0, shadow_share=1.0, epoch=1))
        bodies = [json.loads(body) for body, *_ in await asyncio.gather(
            *(service.infer(MODEL, None, _keyed_body(f"user-{i}"), None) for i in range(20)))]
        assert {b["model_version"] for b in bodies} == {"1"}  # the client only ever gets stable's answer
        assert {b["outputs"][0]["data"][1] for b in bodies} == {X[0, 1] + X[0, 3]}
        await until_true(lambda: not service._shadow_inflight.get(MODEL))
        shadow = service.evidence.take()[MODEL]["shadow"]
        # the copies past 6 in flight were shed, each other one compared with its stable answer:
        # version 2 answers twice version 1's, so each row's top score moved by (x1 + x3) = 4, no decision did
        assert shadow["shed"] == 14 and shadow["pairs"] == shadow["rows"] == 6
        assert shadow["disagree"] == 0 and shadow["candidate_only_failed"] == 0
        assert shadow["max_abs_diff"] == 4.0 and shadow["score_delta_sum"] == 6 * 4.0
    finally:
        await service.close()
        await runner.close()


async def until_true(check, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_one_hop_bounds_each_versions_wait_for_the_others_batch_not_the_sum_with_its_own(repo, hops):
    publish(repo, 1, cfg=config(latest=2))
    publish(repo, 2)
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    try:
        backends = runner.versions.backends
        for stable_s, candidate_s, one_hop in ((80e-6, 80e-6, True), (20e-6, 99e-6, True), (20e-6, 150e-6, False)):
            hops.clear()
            backends[1].run_s, backends[2].run_s = stable_s, candidate_s
            got = {}
            await runner.infer_many([(1, {"x": X}), (2, {"x": X})], lambda results: got.update(results))
            assert (hops == [[1, 2]]) is one_hop, (stable_s, candidate_s)
            assert answers(got[0]) == 1.0 and answers(got[1]) == 2.0
    finally:
        await runner.close()


async def test_a_slow_candidate_runs_beside_stable_and_never_holds_its_answers(repo, monkeypatch):
    publish(repo, 1, cfg=config(latest=2))
    publish(repo, 2, work=300)  # about 100 ms a batch here
    runner = await ModelRunner.load(repo.root_uri, MODEL)
    try:
        candidate = runner.versions.backends[2]
        assert candidate.run_s == 0.0  # the warm-up's calls are not counted
        await runner.infer(2, {"x": X})
        assert candidate.run_s > 100e-6  # too slow for one hop, from its first batch
        # Slower still, without using the CPU: under make test's load, the 100 ms its matrix products spin
        # both cores for can starve stable's thread and the loop as long (a fresh run saw stable 90 ms later).
        forward = candidate._forward
        monkeypatch.setattr(candidate, "_forward", lambda inputs: time.sleep(0.5) or forward(inputs))
        done_at = {}
        loop = asyncio.get_running_loop()

        def done(results):
            for i, outputs in results:
                done_at[i] = (loop.time(), outputs)

        await runner.infer_many([(1, {"x": X}), (2, {"x": X})], done)
        assert answers(done_at[0][1]) == 1.0 and answers(done_at[1][1]) == 2.0
        assert done_at[1][0] - done_at[0][0] > 0.3  # stable's answers came first, not with the candidate's
        # a version not loaded is that lane's error, not the other's
        done_at.clear()
        await runner.infer_many([(1, {"x": X}), (7, {"x": X})], done)
        assert answers(done_at[0][1]) == 1.0 and isinstance(done_at[1][1], ModelNotFound)
    finally:
        await runner.close()
