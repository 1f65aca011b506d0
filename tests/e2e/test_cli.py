"""The `fleet` CLI as a user runs it: up, status, a curl and a Ray job against it, down; serve + Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tc

from benchmarks.fault_models import publish_slow
from cluster.ports import free_ports
from e2e._user import fleet_up, user_folder
from serving.registry import ModelRepository

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "e2e-admin-token"
PROJECT = Path(__file__).resolve().parents[2]  # the checkout: what `--working-dir .` uploads


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, trained) -> Path:
    """A folder with a small trained repository, as `make serve` would leave it (the bootstrap's output checked
    by the session's `trained` fixture)."""
    root = tmp_path_factory.mktemp("user")
    user_folder(root, trained)
    # ~100 ms per batch, queue of 8: what `fleet down` must drain.
    publish_slow(ModelRepository(str(root / "model_repository")), "slow", max_batch_size=1, max_queue_size=8)
    # The admin token as its digest only (fleet rollout sends the token from FLEET_ADMIN_TOKEN).
    (root / "fleet.yaml").write_text(f"admin_token: sha256:{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}\n")
    return root


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["FLEET_CONFIG"] = str(root / "fleet.yaml")  # the admin token's digest; defaults and flags otherwise
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _ask_until_refused(url: str, body: bytes, answered: list, stop: threading.Event) -> None:
    """Send requests with ids until one fails (the cluster stopping); keep the ids answered 200."""
    i = 0
    while not stop.is_set():
        rid = f"{threading.get_ident()}-{i}"
        i += 1
        doc = json.loads(body)
        doc["id"] = rid
        request = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                if answer.status == 200:
                    answered.append(rid)
        except Exception:  # noqa: BLE001 - refused once the listener closes: what fleet down does
            return


def test_up_status_curl_job_down(workdir: Path):
    env = _env(workdir)
    up, flags = fleet_up([], workdir, env)
    port, dash = int(flags[1]), int(flags[3])
    down = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"fleet is serving on http://127.0.0.1:{port}" in up.stdout
        curl = re.search(r"^\s+(curl .+)$", up.stdout, re.M)
        assert curl, up.stdout
        answer = subprocess.run(curl.group(1), shell=True, capture_output=True, text=True, timeout=30)
        doc = json.loads(answer.stdout)
        assert doc["model_name"] == "fraud" and doc["outputs"][0]["shape"] == [1, 1]
        assert 0.0 <= doc["outputs"][0]["data"][0] <= 1.0

        status = _run(["fleet", "status", *flags], workdir, env)
        assert status.returncode == 0, status.stderr
        assert re.search(r"fraud\s+versions 1\s+READY\s+colocated in the ingress replicas", status.stdout), \
            status.stdout
        assert f"ingress replicas: {min(8, os.cpu_count())}" in status.stdout

        # A second cluster on top of the first is refused, the first keeps serving.
        again = _run(["fleet", "up", *flags], workdir, env)
        assert again.returncode != 0 and "already running" in (again.stdout + again.stderr)

        # The README's submit line, from the checkout: the job publishes into the cluster's repository
        # (FLEET_REPOSITORY), not into its copy of the working dir.
        job_env = dict(env, RAY_AUTH_MODE="token")
        for _ in range(3):  # a loaded machine: the job agent may time out and say "try again later"
            job = _run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".", "--",
                        "python", "-m", "training.retrain", "--model", "fraud", "--num-workers", "2", "--epochs", "1",
                        "--cpus-per-worker", "0.25"], PROJECT, job_env, timeout=300)
            if "No available agent" not in job.stderr:
                break
        assert job.returncode == 0, job.stdout + job.stderr
        assert "published fraud version 2 " in job.stdout and str(workdir / "model_repository" / "fraud" / "2") \
            in job.stdout, job.stdout[-3000:]
        assert (workdir / "model_repository" / "fraud" / "2" / "metadata.json").exists()

        # fleet train: the same through the Jobs SDK, authentication handled, logs followed; accepted
        # (--tolerance 1), so it replaces version 2 as the canary (fraud rolls out by canary, the default).
        env_no_auth = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        train = _run(["fleet", "train", "fraud", "--state-dir", str(workdir / ".fleet"), "--epochs", "1",
                      "--num-workers", "1", "--cpus-per-worker", "0.25", "--tolerance", "1"], workdir, env_no_auth)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr
        assert "epoch 1/1" in train.stdout and "published fraud version 3 (accepted" in train.stdout
        assert "CPU priority: nice 10" in train.stdout  # train_nice's default: below the serving replicas
        assert "SUCCEEDED" in train.stdout
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                       "data": [0.0] * 30}]}).encode()
        # fleet rollout: the canary of version 3 (it supersedes version 2's, if the gate accepted that one), then
        # promoted by hand.
        rollout_env = dict(env, FLEET_ADMIN_TOKEN=ADMIN_TOKEN)
        deadline = time.monotonic() + 30
        state: dict = {}
        while time.monotonic() < deadline and state.get("candidate") != 3:
            status = _run(["fleet", "rollout", "status", "fraud", "--json"], workdir, rollout_env)
            state = json.loads(status.stdout) if status.returncode == 0 else {}
            time.sleep(0.5)
        assert state.get("status") == "canary" and state["stable"] == 1 and state["candidate"] == 3, status.stdout
        assert state["history"][-1]["event"] == "start" and state["history"][-1]["version"] == 3
        refused = _run(["fleet", "rollout", "promote", "fraud"], workdir, env)  # no token
        assert refused.returncode == 1 and "(401)" in refused.stdout, refused.stdout
        promote = _run(["fleet", "rollout", "promote", "fraud"], workdir, rollout_env)
        assert promote.returncode == 0 and "status idle, stable 3, candidate None" in promote.stdout, promote.stdout
        deadline = time.monotonic() + 30  # the promise: served within 30 s (poll 5 s, refresh 2 s)
        version = None
        while time.monotonic() < deadline and version != "3":
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/fraud/infer", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                version = json.loads(answer.read())["model_version"]
            time.sleep(0.5)
        assert version == "3"

        # fleet down drains: requests queued on the slow model (one ~100 ms batch at a time per replica)
        # when it is run are answered, not dropped.
        slow = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}).encode()
        answers: list = []

        def ask() -> None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/slow/infer", data=slow,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    answers.append(answer.status)
            except Exception as exc:  # noqa: BLE001 - the assertion shows it
                answers.append(repr(exc))

        askers = [threading.Thread(target=ask) for _ in range(8)]
        # ... and while fleet down runs, fraud is under load: every request answered 200 is in the
        # prediction log once the cluster has stopped (each replica writes its buffer as it drains).
        logged_ids: list[str] = []
        stop = threading.Event()
        fraud_url = f"http://127.0.0.1:{port}/v2/models/fraud/infer"
        loaders = [threading.Thread(target=_ask_until_refused, args=(fraud_url, body, logged_ids, stop))
                   for _ in range(4)]
        for t in [*loaders, *askers]:
            t.start()
        time.sleep(1.0)
        down = _run(["fleet", "down", *flags], workdir, env)
        stop.set()
        for t in [*askers, *loaders]:
            t.join()
        assert answers == [200] * 8, answers
        import pyarrow.dataset as ds

        log = ds.dataset(workdir / "data" / "traffic" / "fraud", partitioning="hive").to_table(
            columns=["request_id", "version"])
        logged = set(log["request_id"].to_pylist())
        assert len(logged_ids) > 50, len(logged_ids)
        missing = [rid for rid in logged_ids if rid not in logged]
        assert not missing, f"{len(missing)} of {len(logged_ids)} answered requests are not in the log: {missing[:5]}"
        slow_log = ds.dataset(workdir / "data" / "traffic" / "slow", partitioning="hive").to_table()
        assert slow_log.num_rows >= 8  # the queued slow requests answered during the drain are logged too
    finally:
        if down is None:
            down = _run(["fleet", "down", *flags], workdir, env)
    assert down.returncode == 0 and "fleet stopped" in down.stdout
    assert not _port_open(port) and not _port_open(dash)
    assert "no cluster is running" in _run(["fleet", "status", *flags], workdir, env).stdout


def test_serve_in_foreground_until_ctrl_c(workdir: Path):
    """The other modes: Ray Serve's HAProxy ingress in front, the model in its own worker deployment."""
    env = _env(workdir)
    port, dash, grpc_port = free_ports(3)
    proc = subprocess.Popen(["fleet", "serve", "--port", str(port), "--dashboard-port", str(dash),
                             "--grpc-port", str(grpc_port),
                             "--http-server", "serve", "--placement", "split", "--ingress-replicas", "1"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        assert any("Ctrl-C stops it" in x for x in lines), "".join(lines)
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        x = np.zeros((2, 30), np.float32)
        inp = tc.InferInput("features", [2, 30], "FP32")
        inp.set_data_from_numpy(x)
        binary = client.infer("fraud", [inp]).as_numpy("probability")
        inp.set_data_from_numpy(x, binary_data=False)
        as_json = client.infer("fraud", [inp], outputs=[tc.InferRequestedOutput("probability", binary_data=False)])
        assert binary.shape == (2, 1) and np.allclose(binary, as_json.as_numpy("probability"), atol=1e-6)
        # (the first test has retrained fraud in this folder: whichever version is newest)
        status = _run(["fleet", "status", "--port", str(port), "--dashboard-port", str(dash)], workdir, env)
        assert re.search(r"fraud\s+versions \d+\s+READY\s+worker replicas 1", status.stdout), status.stdout
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C at the terminal does
        rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "fleet stopped." in rest
    assert not _port_open(port)
