"""`fleet up --address`: fleet deployed into a two-node Ray cluster it did not start, an ingress on each node.

The cluster is started as a user does, with `ray start`: a head on 127.0.0.3 and a second node on 127.0.0.2
(every 127.x address is this machine's loopback; Ray itself replaces 127.0.0.1 as a node's address with the
machine's outward one), its own temp folder, stopped afterwards by killing exactly the processes that hold
files in that folder (never `ray stop`, which stops every Ray on the machine). A detached actor stands for
another application. fleet attaches with `--host node` (each ingress replica listens on its own node's address)
and `--ingress-per-node 1`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from e2e._user import BIN, run, user_folder
from cluster.ports import free_ports

pytestmark = pytest.mark.e2e

HEAD, NODE = "127.0.0.3", "127.0.0.2"

# Run against the cluster (argv[1]: its address): start the other application, or report what runs.
_SENTINEL = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="other-app", log_to_driver=False)

@ray.remote(num_cpus=0)
class Sentinel:
    def ping(self):
        return "alive"

if sys.argv[2] == "start":
    sentinel = Sentinel.options(name="sentinel", lifetime="detached").remote()
    print(json.dumps(ray.get(sentinel.ping.remote())))
else:
    from ray.util.state import list_actors
    alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    actors = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)]
    print(json.dumps({"nodes": alive, "sentinel": ray.get(ray.get_actor("sentinel").ping.remote()),
                      "actors": actors}))
"""


def _stop_cluster(temp_dir: Path) -> None:
    """Kill the processes holding a file under `temp_dir`: this cluster's, and no other Ray's."""
    for _ in range(3):
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fds = list((entry / "fd").iterdir())
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd).startswith(str(temp_dir)):
                        pids.append(int(entry.name))
                        break
                except OSError:
                    continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1.0)



def _ray_start(args: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, str]:
    """`ray start args` with its output in `log`: the daemons it leaves running would hold a pipe open forever."""
    with open(log, "a") as out:
        code = subprocess.run(["ray", "start", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=120).returncode
    return code, log.read_text()[-3000:]


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_fleet_up_address_serves_on_every_node_of_a_running_cluster_and_down_leaves_the_cluster(tmp_path: Path):
    env = user_folder(tmp_path)
    env["RAY_AUTH_MODE"] = "token"  # the cluster's token authentication (~/.ray/auth_token), as a user sets it
    temp = Path(f"/tmp/ray-attach-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    for attempt in range(3):
        gcs, dashboard, port = free_ports(3)  # the head's GCS and dashboard, fleet's port: distinct, in one call
        try:
            log = tmp_path / "ray-start.log"
            code, said = _ray_start(["--head", f"--node-ip-address={HEAD}", f"--port={gcs}",
                                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                                     f"--temp-dir={temp}", "--disable-usage-stats"], tmp_path, env, log)
            if code != 0 and attempt < 2:  # a port taken meanwhile: other ports
                continue
            assert code == 0, said
            address = f"{HEAD}:{gcs}"
            code, said = _ray_start([f"--address={address}", f"--node-ip-address={NODE}", "--num-cpus=2",
                                     f"--temp-dir={temp}"], tmp_path, env, log)
            assert code == 0, said

            def sentinel(action: str):
                out = run([str(BIN / "python"), "-c", _SENTINEL, address, action], tmp_path, env)
                assert out.returncode == 0, out.stderr[-3000:]
                return json.loads(out.stdout.strip().splitlines()[-1])

            assert sentinel("start") == "alive"
            flags = ["--address", address, "--host", "node", "--port", str(port), "--ingress-per-node", "1",
                     "--state-dir", str(tmp_path / "state")]
            up = run(["fleet", "up", *flags], tmp_path, env)
            if up.returncode != 0 and "in use" in up.stdout + up.stderr and attempt < 2:
                run(["fleet", "down", *flags], tmp_path, env)
                continue
            assert up.returncode == 0, up.stdout + up.stderr
            rows = np.random.default_rng(3).normal(size=(2, 30)).astype(np.float32)
            body = {"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32",
                                "data": rows.ravel().tolist()}]}
            answers = []
            for host in (HEAD, NODE):  # each node's own ingress answers on its own address
                probe = _get(f"http://{host}:{port}/-/healthz")
                assert probe is not None and probe.status_code == 200 and probe.text == "success", host
                answer = httpx.post(f"http://{host}:{port}/v2/models/fraud/infer", json=body, timeout=30)
                assert answer.status_code == 200, answer.text
                answers.append(answer.json()["outputs"][0]["data"])
            assert answers[0] == answers[1]  # the same model on both nodes
            status = run(["fleet", "status", "--json", *flags], tmp_path, env)
            info = json.loads(status.stdout)
            assert info["attached"] and info["status"] == "ready", info
            assert {h: d.get("ingress") for h, d in info["nodes"].items()} == {HEAD: 1, NODE: 1}, info
            assert "MonitorActor" in sentinel("check")["actors"]
            down = run(["fleet", "down", *flags], tmp_path, env)
            assert down.returncode == 0 and "fleet stopped" in down.stdout, down.stdout + down.stderr
            # fleet's listeners and actors are gone; the cluster, its two nodes and the other application are not.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(_get(f"http://{h}:{port}/v2/health/live") for h in (HEAD, NODE)):
                time.sleep(0.5)
            assert not any(_get(f"http://{h}:{port}/v2/health/live") for h in (HEAD, NODE))
            after = sentinel("check")
            assert after["nodes"] == sorted((HEAD, NODE)) and after["sentinel"] == "alive", after
            assert not {"MonitorActor", "ServeReplica:fleet:ingress"} & set(after["actors"]), after
            return
        finally:
            _stop_cluster(temp)
            shutil.rmtree(temp, ignore_errors=True)
    pytest.fail("no free ports after three attempts")
