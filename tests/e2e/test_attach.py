"""`fleet up --address`: fleet deployed into a two-node Ray cluster it did not start, an ingress on each node.

The cluster is started as a user does, with `ray start`: a head on 127.0.0.3 and a second node on 127.0.0.2
(every 127.x address is this machine's loopback; Ray itself replaces 127.0.0.1 as a node's address with the
machine's outward one), its own temp folder, stopped afterwards by killing exactly the processes that hold
files in that folder (never `ray stop`, which stops every Ray on the machine). A detached actor stands for
another application. fleet attaches with `--host node` (each ingress replica listens on its own node's address)
and `--ingress-per-node 1`, its model in a worker replica on each node, the repository and the data folder on
S3 (a moto server on loopback). A version published on the shared repository reaches both nodes; then the
second node is killed under load (benchmarks/raynodes.py), and the prediction log on S3 holds every request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.dataset as ds
import pytest

from benchmarks.raynodes import HEAD, NODE, kill_node, load_with_fault, start_nodes
from cluster.ports import free_ports
from e2e._user import BIN, run, user_folder
from integration._s3 import BUCKET, S3Server
from serving.registry import ModelRepository

pytestmark = pytest.mark.e2e

# Run against the cluster (argv: its address, start|check, the head's address): start the other application, or
# report what runs.
_SENTINEL = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="other-app", log_to_driver=False)

@ray.remote(num_cpus=0)
class Sentinel:
    def ping(self):
        return "alive"

if sys.argv[2] == "start":
    # On the head (the node:<address> resource of its node): the second node is lost later on.
    sentinel = Sentinel.options(name="sentinel", lifetime="detached", resources={f"node:{sys.argv[3]}": 0.01}).remote()
    print(json.dumps(ray.get(sentinel.ping.remote())))
else:
    from ray.util.state import list_actors
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    # (the address given: make test runs another Ray cluster beside the e2e tests, and without it the state API
    # finds both and refuses to choose)
    actors = [a.class_name for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000)]
    print(json.dumps({"nodes": alive, "sentinel": ray.get(ray.get_actor("sentinel").ping.remote()),
                      "actors": actors}))
"""


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def _publish_copy(repo: ModelRepository, source: ModelRepository | None = None) -> int:
    """Publish `source`'s newest fraud version (default: `repo`'s) into `repo` as a new version, with its config
    (what a training job on the shared repository does, without the training)."""
    source = source or repo
    newest = source.accepted_versions("fraud")[-1]
    model = source.model_file("fraud", newest)
    data = Path(model).read_bytes() if isinstance(model, str) else model.getvalue()
    return repo.publish("fraud", {"model.pt": data}, {**source.metadata("fraud", newest), "copied_from": newest},
                        config=source.config_proto("fraud"))


@pytest.fixture
def s3(tmp_path: Path, monkeypatch):
    """A real S3-compatible server (moto) on loopback holding the cluster's repository and data folder; the
    credentials (dummy: moto takes any) in a shared-credentials file, as on machines that have one: no key in
    anyone's environment."""
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[default]\naws_access_key_id = fleet-e2e\naws_secret_access_key = fleet-e2e\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = S3Server(tmp_path / "moto.log").start()
    try:
        server.filesystem().create_dir(BUCKET)
        yield server
    finally:
        server.stop()


def test_fleet_up_address_serves_on_every_node_survives_losing_one_and_down_leaves_the_cluster(
        tmp_path: Path, s3, trained):
    env = user_folder(tmp_path, trained)  # the environment has the credentials file's name (the s3 fixture set it)
    # The repository and the data folder on S3, shared by both nodes: the trained model copied there.
    repository, data = s3.uri("models"), s3.uri("data")
    remote = ModelRepository(repository)
    assert _publish_copy(remote, ModelRepository(str(tmp_path / "model_repository"))) == 1
    env.update(FLEET_REPOSITORY=repository, FLEET_DATA_DIR=data)
    env["RAY_AUTH_MODE"] = "token"  # the cluster's token authentication (~/.ray/auth_token), as a user sets it
    # fraud in worker replicas (one per node, by Serve's spreading), so a batch in flight on the node that is
    # lost has to be answered by the other one.
    env.update(FLEET_PLACEMENT="split", FLEET_WORKER_REPLICAS="2", FLEET_VERSION_POLL_INTERVAL_S="1")
    nodes = None
    for attempt in range(3):
        # the head's GCS and dashboard, fleet's HTTP and gRPC ports: distinct, in one call
        gcs, dashboard, port, grpc_port = free_ports(4)
        nodes = start_nodes(tmp_path, env, gcs, dashboard)
        if nodes is not None:
            break
    else:
        pytest.fail((tmp_path / "ray-start.log").read_text()[-3000:])
    try:
        address = nodes.address

        def sentinel(action: str):
            out = run([str(BIN / "python"), "-c", _SENTINEL, address, action, HEAD], tmp_path, env)
            assert out.returncode == 0, out.stderr[-3000:]
            return json.loads(out.stdout.strip().splitlines()[-1])

        assert sentinel("start") == "alive"
        flags = ["--address", address, "--host", "node", "--port", str(port), "--grpc-port", str(grpc_port),
                 "--ingress-per-node", "1",
                 "--state-dir", str(tmp_path / "state")]
        up = run(["fleet", "up", *flags], tmp_path, env)
        assert up.returncode == 0, up.stdout + up.stderr
        rows = np.random.default_rng(3).normal(size=(2, 30)).astype(np.float32)
        body = {"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32", "data": rows.ravel().tolist()}]}
        answers = []
        for host in (HEAD, NODE):  # each node's own ingress answers on its own address
            deadline = time.monotonic() + 30  # (once, on a loaded machine, the node did not answer within 5 s)
            while True:
                probe = _get(f"http://{host}:{port}/-/healthz")
                if (probe is not None and probe.status_code == 200) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert probe is not None and probe.status_code == 200 and probe.text == "success", host
            answer = httpx.post(f"http://{host}:{port}/v2/models/fraud/infer", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            answers.append(answer.json()["outputs"][0]["data"])
        assert answers[0] == answers[1]  # the same model on both nodes
        status = run(["fleet", "status", "--json", *flags], tmp_path, env)
        info = json.loads(status.stdout)
        assert info["attached"] and info["status"] == "ready", info
        assert {h: (d.get("ingress"), d.get("worker-fraud")) for h, d in info["nodes"].items()} == \
            {HEAD: (1, 1), NODE: (1, 1)}, info
        assert "MonitorActor" in sentinel("check")["actors"]

        # A version published on the shared repository reaches both nodes (each replica polls it).
        version = _publish_copy(remote)  # files first, its marker last (serving/registry.py)
        assert version == 2
        deadline = time.monotonic() + 60
        ready = {}
        while time.monotonic() < deadline and not all(ready.values() or [False]):
            for host in (HEAD, NODE):
                probe = _get(f"http://{host}:{port}/v2/models/fraud/versions/{version}/ready")
                ready[host] = probe is not None and probe.status_code == 200
            time.sleep(0.5)
        assert ready == {HEAD: True, NODE: True}, ready

        # The second node lost under load: the head's ingress goes on, its batches on the lost node's worker
        # answered by the head's.
        killed_at, records, result = load_with_fault(HEAD, port, lambda: kill_node(nodes.temp_dir, NODE))
        failed = int(np.sum((records[:, 2] != 200) | (records[:, 4] != 0)))
        after = records[records[:, 1] >= killed_at + 2.0]
        print(f"\nnode lost under load: {len(records)} requests, {failed} failed, statuses {result.statuses}, "
              f"errors {result.errors}; {len(after)} sent from 2 s after the loss, "
              f"{int(np.sum(after[:, 2] != 200))} of them failed")
        assert failed <= 0.001 * len(records), (result.statuses, result.errors)
        assert len(after) > 100 and np.all(after[:, 2] == 200)  # the surviving node serves within 2 s
        probe = _get(f"http://{HEAD}:{port}/-/healthz")
        assert probe is not None and probe.status_code == 200 and probe.text == "success"
        assert _get(f"http://{NODE}:{port}/-/healthz") is None  # the lost node answers nothing

        down = run(["fleet", "down", *flags], tmp_path, env)
        assert down.returncode == 0 and "fleet stopped" in down.stdout, down.stdout + down.stderr
        # Every request the head's ingress answered is in the prediction log on S3 (it wrote its buffer as it
        # stopped); the lost node's unwritten rows went with it.
        logged = ds.dataset(f"{BUCKET}/data/traffic/fraud", filesystem=s3.filesystem(), partitioning="hive")
        assert logged.count_rows() >= len(records), (logged.count_rows(), len(records))
        # fleet's listener and actors are gone; the cluster (its head) and the other application are not.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _get(f"http://{HEAD}:{port}/v2/health/live"):
            time.sleep(0.5)
        assert not _get(f"http://{HEAD}:{port}/v2/health/live")
        after = sentinel("check")
        assert HEAD in after["nodes"] and after["sentinel"] == "alive", after
        assert not {"MonitorActor", "ServeReplica:fleet:ingress"} & set(after["actors"]), after
    finally:
        nodes.stop()
