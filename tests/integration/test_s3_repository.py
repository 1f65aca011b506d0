"""The model repository on S3, against a real S3-compatible server on loopback (moto; see _s3.py).

A version is visible only once its completion marker is written, last; concurrent publishers
never share a folder; and a replica's poll of an unchanged repository costs the same few
requests whether the model has 1 version or 20 (counted at the server).
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow.fs as pafs
import pytest

from serving.errors import ModelNotFound, RepositoryError
from serving.model_config import TensorSpec, make_config
from serving.registry import COMPLETE_FILE, ModelRepository
from serving.versions import ServedVersions
from unit._scaled import model_bytes

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def config(name: str):
    return make_config(name, [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8)


@pytest.fixture
def repo_uri(s3_server, request) -> str:
    return s3_server.uri(f"repo-{request.node.name}")


async def test_a_torchscript_version_published_to_s3_is_listed_loaded_and_served(repo_uri):
    repo = ModelRepository(repo_uri)
    assert not repo.is_local and repo.is_empty()
    assert repo.publish("m", {"model.pt": model_bytes(1.0)}, {"auc": 0.7}, config=config("m")) == 1
    assert repo.publish("m", {"model.pt": model_bytes(2.0)}, {"auc": 0.8, "gate": "accepted"}) == 2
    assert repo.publish("m", {"model.pt": model_bytes(3.0)}, {"gate": "rejected"}) == 3

    reader = ModelRepository(repo_uri)  # another replica
    assert reader.list_models() == ["m"]
    assert reader.list_versions("m") == [1, 2, 3]
    assert reader.accepted_versions("m") == [1, 2]
    assert reader.served_versions("m") == [2]
    assert reader.metadata("m", 2) == {"auc": 0.8, "gate": "accepted"}
    assert reader.version("m", 2).path.endswith("/m/2")
    marker = json.loads(reader.fs.open_input_stream(f"{reader.root}/m/2/{COMPLETE_FILE}").read())
    assert marker["files"] == ["metadata.json", "model.pt"]
    names = sorted(i.base_name for i in reader.fs.get_file_info(pafs.FileSelector(f"{reader.root}/m/2")))
    assert names == [COMPLETE_FILE, "metadata.json", "model.pt"]  # the publisher's claim is gone

    versions = ServedVersions(reader, "m", reader.spec("m"))
    try:
        assert await versions.sync()
        assert versions.served == (2,)
        out = await versions.backends[2].infer({"x": X})
        np.testing.assert_allclose(out["y"], 2.0 * (X[:, :2] + X[:, 2:]))  # version 2's file, read from S3
    finally:
        await versions.close()


def test_a_version_without_its_marker_is_invisible_until_the_marker_is_written(repo_uri):
    repo = ModelRepository(repo_uri)
    repo.publish("m", {"model.pt": model_bytes(1.0)}, {}, config=config("m"))
    # A publisher that died after its files, before the marker: everything there but the marker.
    folder = f"{repo.root}/m/2"
    for name, data in (("model.pt", model_bytes(2.0)), ("metadata.json", b"{}")):
        with repo.fs.open_output_stream(f"{folder}/{name}") as f:
            f.write(data)
    reader = ModelRepository(repo_uri)
    assert reader.list_versions("m") == [1]
    assert reader.served_versions("m") == [1]
    with pytest.raises(ModelNotFound, match="no published version 2"):
        reader.version("m", 2)
    with pytest.raises(ModelNotFound, match="not published"):
        reader.model_file("m", 2)
    # The next publish skips the half-written number rather than write into its folder.
    assert repo.publish("m", {"model.pt": model_bytes(3.0)}, {}) == 3
    assert reader.list_versions("m") == [1, 3]
    with repo.fs.open_output_stream(f"{folder}/{COMPLETE_FILE}") as f:
        f.write(b"")  # completed by hand: now it counts
    assert reader.list_versions("m") == [1, 2, 3]


def test_a_publish_that_fails_before_its_marker_leaves_no_version(repo_uri, monkeypatch):
    repo = ModelRepository(repo_uri)
    repo.publish("m", {"model.pt": model_bytes(1.0)}, {}, config=config("m"))
    put = repo._put

    def fail_at_the_marker(path: str, data: bytes) -> None:
        if path.endswith("/" + COMPLETE_FILE):
            raise OSError("injected: the connection dropped before the marker")
        put(path, data)

    monkeypatch.setattr(repo, "_put", fail_at_the_marker)
    with pytest.raises(OSError, match="injected"):
        repo.publish("m", {"model.pt": model_bytes(2.0)}, {"i": 2})
    monkeypatch.undo()
    reader = ModelRepository(repo_uri)
    assert reader.list_versions("m") == [1]
    left = reader.fs.get_file_info(pafs.FileSelector(f"{reader.root}/m/2", allow_not_found=True))
    assert [i.base_name for i in left] == []  # its files were taken back
    assert repo.publish("m", {"model.pt": model_bytes(3.0)}, {"i": 3}) in (2, 3)
    assert reader.served_versions("m") == [reader.list_versions("m")[-1]]


def test_a_reader_never_sees_a_version_before_all_of_it_is_there(repo_uri):
    repo = ModelRepository(repo_uri)
    payload = os.urandom(3 << 20)  # a multi-part upload: several requests per file
    repo.publish("big", {"model.pt": payload}, {"i": 0}, config=config("big"))
    reader = ModelRepository(repo_uri)
    spec = reader.spec("big")
    checked: set[int] = set()
    bad: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for v in reader.list_versions("big", spec):
                if v in checked:
                    continue
                data = reader.model_file("big", v, spec).getvalue()
                meta = reader.metadata("big", v)
                if data != payload or meta != {"i": v - 1}:
                    bad.append(f"version {v}: {len(data)} bytes, metadata {meta}")
                checked.add(v)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        numbers = [repo.publish("big", {"model.pt": payload}, {"i": i}) for i in range(1, 4)]
    finally:
        stop.set()
        watcher.join()
    assert numbers == [2, 3, 4]
    assert bad == []
    assert reader.list_versions("big", spec) == [1, 2, 3, 4]


def test_concurrent_publishers_on_s3_get_distinct_numbers_and_keep_their_own_files(repo_uri):
    ModelRepository(repo_uri).publish("m", {"model.pt": b"first"}, {}, config=config("m"))
    results: dict[int, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def publish(i: int) -> None:
        repo = ModelRepository(repo_uri)  # each its own publisher, as jobs on different nodes
        try:
            barrier.wait()
            results[i] = repo.publish("m", {"model.pt": f"model-{i}".encode()}, {"publisher": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results.values())) == 6 and min(results.values()) >= 2
    reader = ModelRepository(repo_uri)
    for i, number in results.items():
        assert reader.model_file("m", number).getvalue() == f"model-{i}".encode()
        assert reader.metadata("m", number) == {"publisher": i}
    # Publishers that met back off and take another number: a number may be skipped, never shared.
    assert set(reader.list_versions("m")) == {1, *results.values()}


def test_an_explicit_version_being_published_by_another_is_refused(repo_uri):
    repo = ModelRepository(repo_uri)
    repo.publish("m", {"model.pt": b"v1"}, {}, config=config("m"))
    with repo.fs.open_output_stream(f"{repo.root}/m/5/_fleet_claim-someone-else") as f:
        f.write(b"{}")
    with pytest.raises(RepositoryError, match="version 5 exists"):
        repo.publish("m", {"model.pt": b"v5"}, {}, version=5)
    with pytest.raises(RepositoryError, match="version 1 exists and is immutable"):
        repo.publish("m", {"model.pt": b"again"}, {}, version=1)
    assert repo.model_file("m", 1).getvalue() == b"v1"


async def test_a_poll_of_an_unchanged_repository_costs_the_same_requests_for_1_or_20_versions(s3_server):
    uri = s3_server.uri("repo-polling")
    repo = ModelRepository(uri)
    data = model_bytes(1.0)
    repo.publish("one", {"model.pt": data}, {}, config=config("one"))
    repo.publish("many", {"model.pt": data}, {}, config=config("many"))
    for _ in range(19):
        repo.publish("many", {"model.pt": data}, {"gate": "accepted"})
    polls = 5
    costs, replicas = {}, {}
    for model, count in (("one", 1), ("many", 20)):
        replica = ModelRepository(uri)
        replicas[model] = versions = ServedVersions(replica, model, replica.spec(model))
        await versions.sync()  # the first poll reads each version's marker and metadata once
        assert versions.served == (count,)
        mark = s3_server.mark()
        for _ in range(polls):
            assert not await versions.sync()
        costs[model] = s3_server.requests_since(mark)
    try:
        print("requests of", polls, "polls:", {model: len(requests) for model, requests in costs.items()},
              costs["many"][:2])
        # Per poll, whatever the count: one listing of the model's folder, one look at serving.json and one at
        # rollout.json (a HEAD each: 404, there are none).
        assert len(costs["one"]) == len(costs["many"]) <= 3 * polls, costs
        assert sum(method == "GET" and "list-type=2" in path for method, path in costs["many"]) == polls
        # A version published meanwhile is served at the next poll, for the price of its marker, metadata and file.
        repo.publish("many", {"model.pt": model_bytes(21.0)}, {})
        mark = s3_server.mark()
        assert await replicas["many"].sync()
        new = s3_server.requests_since(mark)
        assert replicas["many"].served == (21,)
        print("requests of the poll that found version 21:", new)
        # The poll's 3, then HEAD of the marker, HEAD + GET of metadata.json and of model.pt.
        assert len(new) <= 3 + 5, new
    finally:
        for versions in replicas.values():
            await versions.close()
