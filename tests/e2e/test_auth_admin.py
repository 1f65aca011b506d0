"""API keys, the admin token, rate limits and the admin endpoints on a cluster started as a user does.

`secured_cluster` (module scope) is `fleet up` in a folder with a small fraud repository and a
fleet.yaml setting api_keys, admin_token and a low rate limit; its two ingress replicas (one
per CPU) each hold the model and poll the repository every second. Other tests against the
same kind of cluster (graceful drain) can take the fixture too. The last test restarts it
(`fleet down` / `fleet up`); `fleet down` runs at the end of the module.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from benchmarks.raynodes import descendants
from cluster.ports import free_ports
from cluster.status import ray_token
from serving.registry import SERVING_FILE, ModelRepository
from training.bootstrap import FRAUD_CLIP, bootstrap
from training.preprocess_reference import standardize

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
KEY, PROBE_KEY, RATE_KEY = "key-alpha-7f3a", "key-probe-91c2", "key-rate-55d0"
ADMIN_TOKEN = "admin-token-c0ffee"
RATE_RPS, RATE_BURST = 10, 40  # per key and ingress replica: above two sweeps (2 x SWEEP) on one replica
POLL_S = 1.0  # version_poll_interval_s
SWEEP = 16  # fresh connections per check: the kernel spreads them over both replicas (P(miss one) = 2^-15)
X = np.random.default_rng(7).normal(size=(3, 30)).astype(np.float32)


@dataclass
class SecuredCluster:
    """A running `fleet up` cluster with auth on; `up()` / `down()` restart it on the same ports."""

    workdir: Path
    port: int
    dashboard_port: int
    grpc_port: int
    repository: ModelRepository

    @property
    def flags(self) -> list[str]:
        return ["--port", str(self.port), "--dashboard-port", str(self.dashboard_port),
                "--grpc-port", str(self.grpc_port),
                "--state-dir", str(self.workdir / ".fleet")]

    def _fleet(self, command: str, **env_extra: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, FLEET_CONFIG=str(self.workdir / "fleet.yaml"),
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        for var in ("FLEET_API_KEYS", "FLEET_ADMIN_TOKEN", "FLEET_API_KEY"):
            env.pop(var, None)
        env.update(env_extra)
        return subprocess.run(["fleet", command, *self.flags], cwd=self.workdir, env=env, capture_output=True,
                              text=True, timeout=300)

    def up(self, *, new_ports_when_taken: bool = False) -> None:
        """`fleet up`; with `new_ports_when_taken`, on two new ports (chosen in one call) when one was taken
        between choosing and binding (the first start only: a restart keeps its ports)."""
        for attempt in range(3 if new_ports_when_taken else 1):
            # The keys and the token in fleet up's environment too (the same as fleet.yaml's): they must stop there.
            out = self._fleet("up", FLEET_API_KEYS=",".join((KEY, PROBE_KEY, RATE_KEY)), FLEET_ADMIN_TOKEN=ADMIN_TOKEN)
            if out.returncode == 0 or "in use" not in out.stdout + out.stderr or not new_ports_when_taken:
                break
            self._fleet("down")
            self.port, self.dashboard_port, self.grpc_port = free_ports(3)
        assert out.returncode == 0 and f"fleet is serving on http://127.0.0.1:{self.port}" in out.stdout, \
            out.stdout + out.stderr

    def down(self) -> None:
        out = self._fleet("down")
        assert out.returncode == 0 and "fleet stopped" in out.stdout, out.stdout + out.stderr
        assert self.call_refused()

    def call_refused(self) -> bool:
        try:
            self.call("GET", "/v2/health/live")
        except OSError:
            return True
        return False

    def audit_lines(self) -> list[str]:
        """The "fleet.audit" lines of the running cluster: its ingress replicas' stderr, in Ray's session logs
        (the session folder ends with the pid of the driver, `fleet up`'s supervisor)."""
        pid = json.loads((self.workdir / ".fleet" / "cluster.json").read_text())["pid"]
        root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
        return [line for path in root.glob(f"session_*_{pid}/logs/worker-*.err")
                for line in path.read_text(errors="replace").splitlines() if "fleet.audit" in line]

    def call(self, method: str, path: str, body: bytes | dict | None = None, token: str | None = None,
             connection: http.client.HTTPConnection | None = None,
             authorization: str | None = None) -> tuple[int, dict, object]:
        """One request (on a fresh connection unless given one): status, headers (lower-cased), JSON body or None.

        `token`: sent as `Authorization: Bearer <token>`; `authorization`: the whole header value instead.
        """
        conn = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if authorization is not None:
            headers["Authorization"] = authorization
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            raw = answer.read()
            headers = {k.lower(): v for k, v in answer.getheaders()}
            is_json = raw and headers.get("content-type", "").startswith("application/json")
            return answer.status, headers, json.loads(raw) if is_json else None
        finally:
            if connection is None:
                conn.close()

    def infer(self, token: str | None = KEY, **kw) -> tuple[int, dict, object]:
        return self.call("POST", "/v2/models/fraud/infer", _infer_body(), token, **kw)

    def sweep(self, method: str, path: str, token: str | None = None, body=None) -> list[tuple[int, object]]:
        """The same request on SWEEP fresh connections (every ingress replica answers some)."""
        return [(s, doc) for s, _, doc in (self.call(method, path, body, token) for _ in range(SWEEP))]

    def wait_for(self, method: str, path: str, status: int, within_s: float) -> float:
        """Seconds until every answer of a sweep of `path` (an open endpoint) has `status`."""
        started = time.monotonic()
        while True:
            got = [s for s, _ in self.sweep(method, path)]
            if got == [status] * SWEEP:
                return time.monotonic() - started
            assert time.monotonic() - started < within_s, f"{path}: {got} after {within_s} s"
            time.sleep(0.1)


def _infer_body() -> dict:
    return {"inputs": [{"name": "features", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}


def _expected(repo: ModelRepository, version: int) -> np.ndarray:
    """What the served file answers for X, standardized and clipped as the server does."""
    model = torch.jit.load(repo.model_file("fraud", version))
    with torch.inference_mode():
        return model(torch.from_numpy(standardize(X, repo.metadata("fraud", version), FRAUD_CLIP))).numpy()


@pytest.fixture(scope="module")
def secured_cluster(tmp_path_factory) -> SecuredCluster:
    """`fleet up` with API keys, an admin token and a rate limit (fleet.yaml); `fleet down` after the module."""
    workdir = tmp_path_factory.mktemp("secured")
    repo = ModelRepository(str(workdir / "model_repository"))
    # The fraud model as `python -m training.bootstrap --trainer plain` trains it (4000 rows, 2 epochs); not the
    # CLI itself, which trains the digits model too (a minute on this machine, over this module's budget).
    bootstrap(repo.root_uri, rows=4000, epochs=2, num_threads=1, log=lambda _: None)
    # The pin test publishes version 2 and unpins back to the version_policy's choice: a switch at once, not
    # a canary (test_rollout.py and test_cli.py cover those).
    config = repo.config_proto("fraud")
    config.parameters["fleet.rollout"].string_value = "immediate"
    repo.write_config("fraud", config)
    (workdir / "fleet.yaml").write_text(json.dumps({  # JSON is YAML
        "api_keys": [KEY, PROBE_KEY, RATE_KEY],
        "admin_token": ADMIN_TOKEN,
        "rate_limit_rps": RATE_RPS,
        "rate_limit_burst": RATE_BURST,
        "version_poll_interval_s": POLL_S,
        "version_retire_grace_s": 1.0,
    }))
    cluster = SecuredCluster(workdir, *free_ports(3), repo)
    try:
        cluster.up(new_ports_when_taken=True)
        yield cluster
    finally:
        cluster.down()


def test_no_key_or_a_wrong_one_is_401_alike_and_a_good_key_gets_the_right_answer(secured_cluster):
    c = secured_cluster
    refused = [c.infer(token=None), c.infer(token="key-alpha-7f3b"), c.infer(token=""),
               c.call("POST", "/v2/models/fraud/infer", _infer_body(), authorization=f"Basic {KEY}"),
               c.call("POST", "/v2/models/fraud/infer", _infer_body(), authorization=KEY)]
    bodies = set()
    for status, headers, doc in refused:
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        bodies.add(json.dumps(doc))
    assert len(bodies) == 1  # one answer for every kind of wrong
    status, _, doc = c.infer(KEY)
    assert status == 200 and doc["model_version"] == "1"
    got = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    assert np.allclose(got, _expected(c.repository, 1), atol=1e-5)
    # Probes and metadata stay open; model metadata, stats and metrics follow the inference rule.
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/fraud/ready"):
        assert c.call("GET", path)[0] == 200, path
    for path in ("/v2/models/fraud", "/v2/models/stats", "/metrics"):
        assert c.call("GET", path)[0] == 401 and c.call("GET", path, token=KEY)[0] == 200, path


def test_the_prediction_log_names_the_key_by_its_id_and_no_key_is_written_anywhere(secured_cluster):
    """Each logged row carries the caller's key id (a digest prefix); feedback needs a key like inference."""
    import hashlib

    import pyarrow.dataset as ds

    c = secured_cluster
    ids = [f"keyed-{i}" for i in range(5)]
    for rid in ids:
        status, _, doc = c.call("POST", "/v2/models/fraud/infer", {**_infer_body(), "id": rid}, PROBE_KEY)
        assert status == 200 and doc["id"] == rid
    label_body = {"labels": [{"id": rid, "label": [0, 0, 1]} for rid in ids]}
    assert c.call("POST", "/v2/models/fraud/feedback", label_body)[0] == 401
    status, _, doc = c.call("POST", "/v2/models/fraud/feedback", label_body, PROBE_KEY)
    assert status == 200 and doc["accepted"] == 15
    assert c.call("GET", "/v2/models/fraud/quality")[0] == 401
    data = c.workdir / "data"
    deadline = time.monotonic() + 15
    rows = None
    while time.monotonic() < deadline:
        # A file appears by rename in a folder made just before it: wait for the first .parquet, not the folder.
        if any((data / "traffic" / "fraud").rglob("*.parquet")):
            table = ds.dataset(data / "traffic" / "fraud", partitioning="hive").to_table(
                columns=["request_id", "key_id"])
            rows = [k for r, k in zip(table["request_id"].to_pylist(), table["key_id"].to_pylist()) if r in ids]
            if len(rows) == 15:
                break
        time.sleep(0.3)
    assert rows == [hashlib.sha256(PROBE_KEY.encode()).hexdigest()[:12]] * 15, rows
    # Neither the keys nor the admin token are in the data folder or the state folder, in any form but digests.
    for folder in (data, c.workdir / ".fleet"):
        for path in folder.rglob("*"):
            if path.is_file():
                raw = path.read_bytes()
                assert not any(secret.encode() in raw for secret in (ADMIN_TOKEN, KEY, PROBE_KEY, RATE_KEY)), path


def _process_tree(root: int) -> list[int]:
    """`root` and every process under it (the supervisor, and the Ray processes it started, workers included)."""
    return [root, *descendants(root)]


def test_no_process_of_the_cluster_and_no_ray_log_holds_a_key_or_the_token_in_plain_text(secured_cluster):
    """`fleet up` ran with the keys and the token in its environment (FLEET_API_KEYS, FLEET_ADMIN_TOKEN) and in
    fleet.yaml: the supervisor and every process under it (GCS, raylet, dashboard, workers, the replicas) hold
    neither in their environment or command line, and Ray's session logs do not either (digests only)."""
    c = secured_cluster
    supervisor = json.loads((c.workdir / ".fleet" / "cluster.json").read_text())["pid"]
    tree = _process_tree(supervisor)
    names = []
    secrets = [secret.encode() for secret in (KEY, PROBE_KEY, RATE_KEY, ADMIN_TOKEN)]
    for pid in tree:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        names.append(cmdline.split(b"\0")[0].decode(errors="replace"))
        assert not any(secret in environ or secret in cmdline for secret in secrets), cmdline[:200]
    # The Ray processes were looked at, not just the supervisor (GCS, raylet, the replicas' workers).
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    assert any("ServeReplica:fleet:ingress" in n for n in names), names
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    logs = [path for path in root.glob(f"session_*_{supervisor}/logs/*") if path.is_file()]
    assert logs
    for path in logs:
        raw = path.read_bytes()
        assert not any(secret in raw for secret in secrets), path
    # Nor the Ray dashboard's pages: Serve's applications (the deployments' options), actors, jobs, nodes.
    pages = {}
    for page in ("/api/serve/applications/", "/api/v0/actors?limit=1000&detail=1", "/api/jobs/",
                 "/nodes?view=summary", "/api/v0/tasks?limit=1000&detail=1"):
        request = urllib.request.Request(f"http://127.0.0.1:{c.dashboard_port}{page}")
        if ray_token():
            request.add_header("Authorization", f"Bearer {ray_token()}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            pages[page] = answer.read()
        assert not any(secret in pages[page] for secret in secrets), page
    assert b"ServeReplica:fleet:ingress" in pages["/api/v0/actors?limit=1000&detail=1"]
    assert b'"fleet"' in pages["/api/serve/applications/"]


def test_fleet_status_sends_the_key_from_fleet_api_key(secured_cluster):
    without = secured_cluster._fleet("status")
    assert "requires an API key (set FLEET_API_KEY" in without.stdout, without.stdout
    with_key = secured_cluster._fleet("status", FLEET_API_KEY=KEY)
    assert with_key.returncode == 0 and re.search(r"fraud\s+versions 1\s+READY", with_key.stdout), with_key.stdout


def test_tritonclient_with_the_authorization_header_works(secured_cluster):
    client = tc.InferenceServerClient(f"127.0.0.1:{secured_cluster.port}")
    inp = tc.InferInput("features", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)  # the binary tensor extension
    got = client.infer("fraud", [inp], headers={"Authorization": f"Bearer {KEY}"}).as_numpy("probability")
    assert np.allclose(got, _expected(secured_cluster.repository, 1), atol=1e-5)
    with pytest.raises(InferenceServerException, match="missing or invalid credentials"):
        client.infer("fraud", [inp])


def test_an_inference_key_on_an_admin_endpoint_is_403_no_token_is_401(secured_cluster):
    c = secured_cluster
    for path in ("/v2/repository/models/fraud/unload", "/v2/repository/models/fraud/load",
                 "/v2/admin/models/fraud/versions"):
        status, _, doc = c.call("POST", path, {"versions": [1]}, KEY)
        assert status == 403 and doc == {"error": "these credentials may not call this endpoint"}
        status, headers, _ = c.call("POST", path, {"versions": [1]}, None)
        assert status == 401 and "www-authenticate" in headers
    assert not (Path(c.repository.root) / "fraud" / SERVING_FILE).exists()


def test_names_and_versions_from_requests_never_escape_the_repository(secured_cluster):
    c = secured_cluster
    before = sorted(p.name for p in Path(c.repository.root).parent.iterdir())
    for path in ("/v2/repository/models/../unload", "/v2/repository/models/..%2F..%2Fetc/unload",
                 "/v2/repository/models/%2e%2e/unload", "/v2/repository/models/fraud%00/unload",
                 "/v2/repository/models/%2Fetc%2Fpasswd/unload", "/v2/admin/models/..%5Cfraud/versions",
                 "/v2/models/..%2Ffraud/infer", "/v2/models/fraud/versions/..%2F1/infer"):
        status, _, doc = c.call("POST", path, {"versions": [1]}, ADMIN_TOKEN)
        assert status in (400, 404), (path, status, doc)
    status, _, doc = c.call("POST", "/v2/admin/models/fraud/versions", {"versions": [1, 99]}, ADMIN_TOKEN)
    assert status == 400 and "no published version 99" in doc["error"]
    status, _, doc = c.call("POST", "/v2/admin/models/fraud/versions", {"versions": ["../1"]}, ADMIN_TOKEN)
    assert status == 400
    assert sorted(p.name for p in Path(c.repository.root).parent.iterdir()) == before
    assert not (Path(c.repository.root) / "fraud" / SERVING_FILE).exists()


def test_a_key_over_its_rate_gets_429_with_retry_after_at_once(secured_cluster):
    c = secured_cluster
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=30)  # one connection: one replica's bucket
    statuses, refused = [], None
    started = time.monotonic()
    try:
        for _ in range(10 * RATE_BURST):
            t0 = time.perf_counter()
            status, headers, doc = c.infer(RATE_KEY, connection=conn)
            statuses.append(status)
            if status == 429:
                refused = (headers, doc, time.perf_counter() - t0)
                break
    finally:
        conn.close()
    elapsed_s = time.monotonic() - started
    assert refused is not None, statuses
    headers, doc, latency_s = refused
    assert set(statuses[:-1]) == {200} and RATE_BURST <= len(statuses) - 1 <= RATE_BURST + RATE_RPS * elapsed_s + 1
    assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1 and "rate limit" in doc["error"]
    assert latency_s < 0.5  # answered at once, not queued
    assert c.infer(KEY)[0] == 200  # another key is not held back
    time.sleep(int(headers["retry-after"]))
    assert c.infer(RATE_KEY)[0] == 200


def test_unload_answers_503_on_every_replica_within_the_poll_interval_and_load_brings_it_back(secured_cluster):
    c = secured_cluster
    status, _, doc = c.call("POST", "/v2/repository/models/fraud/unload", b"", ADMIN_TOKEN)
    assert status == 200 and doc["loaded"] is False and doc["served_versions"] == []
    # The other replica polls within POLL_S (±20 %); a sweep and a loaded machine get 1.5 s more.
    took_s = c.wait_for("GET", "/v2/models/fraud/ready", 503, within_s=POLL_S * 1.2 + 1.5)
    answers = c.sweep("POST", "/v2/models/fraud/infer", PROBE_KEY, _infer_body())
    assert all(s == 503 and "unloaded by an administrator" in doc["error"] for s, doc in answers), answers
    assert [s for s, _ in c.sweep("GET", "/v2/health/ready")] == [200] * SWEEP  # the server ignores it
    status, _, doc = c.call("POST", "/v2/repository/models/fraud/load", b"", ADMIN_TOKEN)
    assert status == 200 and doc["loaded"] is True and doc["served_versions"] == ["1"]
    c.wait_for("GET", "/v2/models/fraud/ready", 200, within_s=POLL_S * 1.2 + 5)
    assert [s for s, _ in c.sweep("POST", "/v2/models/fraud/infer", PROBE_KEY, _infer_body())] == [200] * SWEEP
    print(f"unload reached every replica within {took_s:.2f} s")
    lines = c.audit_lines()  # what changed and who asked; the refused calls of the tests before too
    assert any('admin unload model=fraud {"loaded": true, "versions": null} -> {"loaded": false, "versions": null}'
               in line for line in lines), lines
    assert any("admin load model=fraud" in line for line in lines)
    assert any("admin call refused (403) POST '/v2/repository/models/fraud/unload'" in line for line in lines)
    assert not any(secret in line for line in lines for secret in (ADMIN_TOKEN, KEY, PROBE_KEY, RATE_KEY))


def test_a_version_pin_switches_the_served_version_and_survives_a_restart(secured_cluster):
    c = secured_cluster
    repo = c.repository
    v1 = Path(repo.root) / "fraud" / "1"
    repo.publish("fraud", {"model.pt": (v1 / "model.pt").read_bytes()},
                 json.loads((v1 / "metadata.json").read_text()))
    c.wait_for("GET", "/v2/models/fraud/versions/2/ready", 200, within_s=POLL_S * 1.2 + 5)  # latest: 1 -> 2
    status, _, doc = c.call("POST", "/v2/admin/models/fraud/versions", {"versions": [1]}, ADMIN_TOKEN)
    assert status == 200 and doc["versions"] == [1] and doc["served_versions"] == ["1"]
    c.wait_for("GET", "/v2/models/fraud/versions/2/ready", 503, within_s=POLL_S * 1.2 + 3)
    assert {doc["model_version"] for _, doc in c.sweep("POST", "/v2/models/fraud/infer", PROBE_KEY,
                                                        _infer_body())} == {"1"}
    assert json.loads((Path(repo.root) / "fraud" / SERVING_FILE).read_text())["versions"] == [1]
    c.down()
    c.up()
    assert {doc["model_version"] for _, doc in c.sweep("POST", "/v2/models/fraud/infer", PROBE_KEY,
                                                        _infer_body())} == {"1"}  # still pinned
    status, _, doc = c.call("POST", "/v2/admin/models/fraud/versions", {"versions": None}, ADMIN_TOKEN)
    assert status == 200 and doc["versions"] is None and doc["served_versions"] == ["2"]
    c.wait_for("GET", "/v2/models/fraud/versions/1/ready", 503, within_s=POLL_S * 1.2 + 3)
    lines = c.audit_lines()  # since the restart: the unpin, with what it changed and who asked
    assert any('admin unpin versions model=fraud {"loaded": true, "versions": [1]} -> '
               '{"loaded": true, "versions": null} client=127.0.0.1:' in line for line in lines), lines
    assert not any(secret in line for line in lines for secret in (ADMIN_TOKEN, KEY, PROBE_KEY, RATE_KEY))
