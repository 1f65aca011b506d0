"""fleet on a Ray cluster it did not start: `fleet render serve-config`, then Ray's own `serve deploy`."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from e2e._user import BIN, run, user_folder
from cluster.ports import free_ports

pytestmark = pytest.mark.e2e

API_KEY = "deploy-test-key-1"
ADMIN_TOKEN = "deploy-test-admin"

# A Ray cluster of its own, alive while this script runs (stdin open): what `ray start --head` gives a user,
# stopped with the script and nothing else on the machine.
_HEAD = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), log_to_driver=False)
print("head ready", flush=True)
sys.stdin.read()
"""



def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_rendered_serve_config_deploys_fleet_with_serve_deploy_on_a_running_ray_cluster(tmp_path: Path, trained):
    env = user_folder(tmp_path, trained)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# the inference keys\n{API_KEY}\n")
    env = {**env, "FLEET_API_KEYS_FILE": str(keys), "FLEET_ADMIN_TOKEN": ADMIN_TOKEN}
    for attempt in range(3):
        # fleet's HTTP and gRPC ports and the cluster's dashboard, distinct, in one call
        port, dashboard, grpc_port = free_ports(3)
        config = tmp_path / "fleet-serve.yaml"
        out = run(["fleet", "render", "serve-config", "--port", str(port), "--grpc-port", str(grpc_port),
                   "--ingress-replicas", "1",
                    "--state-dir", str(tmp_path / "state"), "-o", str(config)], tmp_path, env)
        assert out.returncode == 0, out.stderr
        text = config.read_text()
        # The keys and the token only as digests; the keys file is not named (the cluster has no such file).
        assert API_KEY not in text and ADMIN_TOKEN not in text and "keys.txt" not in text
        doc = yaml.safe_load(text)
        ServeDeploySchema.model_validate(doc)
        args = doc["applications"][0]["args"]
        assert args["api_keys"] == ["sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()]
        assert args["port"] == port and doc["proxy_location"] == "Disabled"
        head = subprocess.Popen([str(BIN / "python"), "-c", _HEAD, str(dashboard)], cwd=tmp_path, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = head.stdout.readline()
            if "head ready" not in line:  # the dashboard's port taken meanwhile: other ports
                assert attempt < 2, head.stderr.read()[-3000:]
                continue
            # The cluster's token authentication is on: Ray's CLIs send ~/.ray/auth_token with RAY_AUTH_MODE=token.
            ray_cli = dict(env, RAY_AUTH_MODE="token")
            deploy = run(["serve", "deploy", str(config), "--address", f"http://127.0.0.1:{dashboard}"], tmp_path,
                          ray_cli, timeout=120)
            assert deploy.returncode == 0, deploy.stdout + deploy.stderr
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and not _ready(f"{base}/v2/health/ready"):
                time.sleep(1.0)
            if not _ready(f"{base}/v2/health/ready"):
                status = run(["serve", "status", "--address", f"http://127.0.0.1:{dashboard}"], tmp_path, ray_cli)
                if "in use" in status.stdout and attempt < 2:  # fleet's port taken meanwhile: other ports
                    continue
                pytest.fail(f"fleet did not become ready after serve deploy:\n{status.stdout}\n{status.stderr}")
            probe = httpx.get(f"{base}/-/healthz", timeout=10)  # what KubeRay asks of a serve pod
            assert probe.status_code == 200 and probe.text == "success"
            rows = np.random.default_rng(0).normal(size=(2, 30)).astype(np.float32)
            body = {"id": "deployed-1", "inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32",
                                                    "data": rows.ravel().tolist()}]}
            url = f"{base}/v2/models/fraud/infer"
            assert httpx.post(url, json=body, timeout=30).status_code == 401  # the keys came through, as digests
            answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["id"] == "deployed-1" and got["model_version"] == "1"
            assert len(got["outputs"][0]["data"]) == 2 and all(0.0 <= p <= 1.0 for p in got["outputs"][0]["data"])
            # The monitor the builder started first answers for the rollout controller (the admin token's digest).
            rollout = httpx.get(f"{base}/v2/models/fraud/rollout",
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
            assert rollout.status_code == 200 and rollout.json()["stable"] == 1, rollout.text
            return
        finally:
            head.stdin.close()
            try:
                head.wait(timeout=120)
            except subprocess.TimeoutExpired:
                head.kill()
    pytest.fail("no free ports after three attempts")
