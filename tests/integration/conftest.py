"""One real fleet cluster (Ray + Serve + HAProxy) for the integration tests, and a real Triton.

The repository holds:
- `fraud`         the example model, trained briefly;
- `fraud_slowq`   the same file with a 200 ms max_queue_delay (a lone request must not wait for it),
                  in split mode (its own worker deployment, one DeploymentHandle call per batch);
- `libtorch`      a model laid out by hand for Triton's pytorch_libtorch backend (input__0/output__0);
- `slow`          ~100 ms per batch, one batch in flight, a queue of 2: for overload;
- `slow_deep`     the same, one request per batch and a queue of 64: for queue timeouts;
- `fraud_triton`  forwarded by fleet to a real Triton server serving fraud's TorchScript file
                  (fleet standardizes the features first, as it does for fraud);
- `digits`        the example CNN over uint8 images of any size (resized by fleet's native kernel);
- `fraud_roll`, `fraud_roll_split`  fraud's file, colocated and split, serving the latest 2 versions,
  `fraud_roll_one` split, serving the latest one (`fleet.rollout: immediate`): test_version_switch.py
  publishes versions of them live;
- `fraud_failover` fraud's file in 2 split worker replicas that prefer nodes labelled fleet-role=worker:
                  test_replica_failure.py kills one under load, then a worker node holding one;
- `fraud_triton_fb` Triton on a port where nothing listens at first, `fleet.fallback: fraud`: its circuit
                  breaker opens, fraud answers, until test_triton_fallback.py starts a Triton there;
- monitoring (test_monitoring_*.py), each fraud's file and metadata (its drift reference):
  `fraud_log` plain, for the prediction log and feedback; `fraud_private` logs half its requests
  with `amount` dropped and `distance_km` hashed; `fraud_stall` whose log folder test_monitoring_sink.py
  makes unwritable; `fraud_drift` takes drifted traffic (drift alarms, Prometheus, the webhook);
  `fraud_loop` retrains itself 2 s after an alarm (the monitor's retrain trigger); `fraud_contract`
  (reject) and `fraud_contract_warn` (warn) declare input contracts; `digits_full` logs its images whole;
- rollouts (test_rollout.py), each fraud's file with 5/50/100 % stages of 50 candidate requests:
  `fraud_canary`, `fraud_canary_aa`, `fraud_canary_kill` (canary) and `fraud_shadow` (shadow first).

Every port the session needs is chosen in one call (distinct), and the cluster is started again on
new ones when one was taken between choosing and binding it.

Order: the modules that time the cluster (QUIET_FIRST) run first; test_training_jobs.py's three Ray jobs are
submitted when the first other test starts, train while the rest run, and that module runs last (it waits for
what is left of them). A run without test_training_jobs.py submits nothing.

`s3_server` is a real S3-compatible server (moto, integration/_s3.py) on loopback, started once per
session by the object-storage tests that ask for it (no Ray cluster).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from _collection_order import module_name, order_folder
from benchmarks.fault_models import publish_slow, scripted_bytes
from benchmarks.triton_process import TritonProcess
from cluster.config import FleetSettings
from cluster.local import LocalCluster
from cluster.ports import free_ports, port_taken, ray_agent_port
from serving.model_config import make_config
from serving.registry import ModelRepository
from training.bootstrap import bootstrap
from training.digits import bootstrap_digits

pytestmark = pytest.mark.integration

# Modules whose assertions time the cluster (latencies, throughput steps, pick-up deadlines, failover, a
# Prometheus server's answers, a Triton server's Python stub, which missed its health checks beside the jobs),
# that start a Ray instance of their own (the Ray Serve baseline) or run a Ray Data read (a whole logical CPU,
# which the jobs' reservations hold): they run before the training jobs (niced, but their processes start at
# Ray's priority and hold their logical CPUs longer) share the machine.
QUIET_FIRST = frozenset({
    "test_batching_live.py", "test_load_tools_live.py", "test_overload.py", "test_replica_failure.py",
    "test_rolling_update.py", "test_version_switch.py", "test_rollout.py", "test_triton_fallback.py",
    "test_monitoring_retrain.py", "test_baselines_live.py", "test_monitoring_drift.py", "test_prometheus_live.py",
    "test_prometheus_process.py", "test_monitoring_log.py", "test_triton_backend.py", "test_triton_process.py",
})
JOBS_MODULE = "test_training_jobs.py"

LIBTORCH_CONFIG = """
name: "libtorch"
platform: "pytorch_libtorch"
max_batch_size: 16
input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


ADMIN_TOKEN = "rollout-admin-token"  # the cluster's admin token (the admin and rollout routes)
ROLLOUT_TEST_PARAMETERS = {"fleet.rollout.stages": "5,50,100", "fleet.rollout.min_stage_requests": "50",
                           "fleet.rollout.baseline_requests": "300"}


class _SlowOnMarker(torch.nn.Module):
    """A model that is slow on demand: ~0.3 s of matrix products for a batch holding a row whose x[0] > 1e6."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", torch.randn(384, 384) / 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if bool((x[:, 0] > 1e6).any()):
            acc = self.w
            for _ in range(160):
                acc = torch.tanh(acc @ self.w)
            out = out + 0.0 * acc[0, 0]
        return out


def _save(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def _build_repository(root: Path, triton_url: str, fallback_triton_url: str = "") -> None:
    repo = ModelRepository(str(root))
    bootstrap(str(root), rows=8000, epochs=3, seed=1, num_threads=1, log=lambda *a, **k: None)
    bootstrap_digits(str(root), seed=1, num_threads=1, log=lambda *a, **k: None)
    fraud_file = (root / "fraud" / "1" / "model.pt").read_bytes()
    fraud_spec = repo.spec("fraud")
    fraud_metadata = repo.metadata("fraud", 1)  # its reference statistics: the copies standardize as fraud does
    preprocess = {k: v for k, v in fraud_spec.parameters.items() if k.startswith("preprocess")}
    repo.publish(
        "fraud_slowq",
        {"model.pt": fraud_file},
        {**fraud_metadata, "note": "fraud with a long queue delay"},
        config=make_config("fraud_slowq", list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                           max_queue_delay_us=200_000, parameters={"fleet.placement": "split", **preprocess}),
    )
    # fraud with the response cache on (test_cache_live.py): new versions published while the cluster serves.
    cached = make_config("fraud_cached", list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                         max_queue_delay_us=1000, parameters={"fleet.rollout": "immediate", **preprocess})
    cached.response_cache.enable = True
    repo.publish("fraud_cached", {"model.pt": fraud_file}, {**fraud_metadata, "note": "fraud, cached"}, config=cached)
    # fraud's file again, for test_version_switch.py to publish new versions of while the cluster serves:
    # the latest 2 are served, so version 1 stays reachable by its URL after version 2 arrives; `fraud_roll_one`
    # serves the latest 1 (the default policy), so version 1 leaves and retires.
    # (`fleet.rollout: immediate`: a new version takes the traffic at once; test_rollout.py covers canaries.)
    for name, placement, latest in (("fraud_roll", "colocated", 2), ("fraud_roll_split", "split", 2),
                                    ("fraud_roll_one", "split", 1)):
        repo.publish(
            name,
            {"model.pt": fraud_file},
            {**fraud_metadata, "note": "fraud, to publish live versions of"},
            config=make_config(name, list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                               max_queue_delay_us=1000, latest_versions=latest,
                               parameters={"fleet.placement": placement, "fleet.rollout": "immediate", **preprocess}),
        )
    # fraud's file again, for test_training_jobs.py's Ray jobs to publish retrained versions of.
    for name in ("fraud_jobs", "fraud_tune"):
        repo.publish(
            name,
            {"model.pt": fraud_file},
            {**fraud_metadata, "note": "fraud, for training jobs to publish into"},
            config=make_config(name, list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                               max_queue_delay_us=1000, parameters={"fleet.rollout": "immediate", **preprocess}),
        )
    # Laid out as for Triton, by hand: config text, version folder, no metadata.json.
    torch.manual_seed(0)
    (root / "libtorch" / "1").mkdir(parents=True)
    (root / "libtorch" / "config.pbtxt").write_text(LIBTORCH_CONFIG)
    (root / "libtorch" / "1" / "model.pt").write_bytes(scripted_bytes(torch.nn.Linear(4, 2)))
    publish_slow(repo, "slow", max_batch_size=8, max_queue_size=2)
    publish_slow(repo, "slow_deep", max_batch_size=1, max_queue_size=64)
    repo.write_config(
        "fraud_triton",
        make_config("fraud_triton", list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                    platform="", parameters={"fleet.backend": "triton", "fleet.triton.url": triton_url,
                                             "fleet.triton.model": "fraud", **preprocess}),
    )
    # Fronting Triton needs no model file: version 1 is a folder with fleet's metadata.json only.
    (root / "fraud_triton" / "1").mkdir()
    (root / "fraud_triton" / "1" / "metadata.json").write_text(json.dumps(fraud_metadata))
    # fraud's file in 2 worker replicas, for test_replica_failure.py to kill one of under load; a batch
    # holding a row whose first feature is above 1e6 takes ~0.3 s, so the test can kill a replica mid-batch.
    repo.publish(
        "fraud_failover",
        {"model.pt": _save(_SlowOnMarker(torch.jit.load(io.BytesIO(fraud_file))))},
        {"note": "fraud, in 2 worker replicas to kill one of"},
        config=make_config("fraud_failover", list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                           max_queue_delay_us=1000, instance_count=2,
                           parameters={"fleet.placement": "split", "fleet.worker.prefer_labels": "fleet-role=worker"}),
    )
    _monitoring_models(repo, fraud_file, fraud_spec, fraud_metadata, preprocess)
    # test_rollout.py publishes candidates of these while the cluster serves: short stages, small baselines.
    for name, mode in (("fraud_canary", "canary"), ("fraud_canary_aa", "canary"), ("fraud_canary_kill", "canary"),
                       ("fraud_shadow", "shadow")):
        repo.publish(name, {"model.pt": fraud_file}, {**fraud_metadata, "note": "fraud, to roll versions out"},
                     config=make_config(name, list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                                        max_queue_delay_us=1000,
                                        parameters={**preprocess, **ROLLOUT_TEST_PARAMETERS, "fleet.rollout": mode}))
    # Triton on a port where nothing listens until test_triton_fallback.py starts one: answered by fraud.
    if fallback_triton_url:
        repo.write_config(
            "fraud_triton_fb",
            make_config("fraud_triton_fb", list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                        platform="", parameters={"fleet.backend": "triton", "fleet.triton.url": fallback_triton_url,
                                                 "fleet.triton.model": "fraud", "fleet.fallback": "fraud",
                                                 "fleet.breaker.failures": "3", "fleet.breaker.cooldown_ms": "500",
                                                 "fleet.breaker.max_cooldown_ms": "1000", **preprocess}),
        )
        (root / "fraud_triton_fb" / "1").mkdir()
        (root / "fraud_triton_fb" / "1" / "metadata.json").write_text(json.dumps(fraud_metadata))


def _monitoring_models(repo: ModelRepository, fraud_file: bytes, fraud_spec, fraud_metadata: dict,
                       preprocess: dict) -> None:
    """fraud's file under the names the monitoring tests use (each its own log, labels and drift state)."""
    models = {
        "fraud_log": {},
        "fraud_private": {"fleet.log.sample": "0.5", "fleet.log.redact": "amount=drop,distance_km=hash"},
        "fraud_stall": {},
        "fraud_drift": {},
        "fraud_loop": {"fleet.retrain.model": "fraud", "fleet.retrain.after_s": "2",
                       "fleet.retrain.args": "--epochs 1 --num-workers 1 --cpus-per-worker 0.5"},
        "fraud_contract": {"fleet.contract.amount": "range 0 100000", "fleet.contract.is_foreign": "in 0 1"},
        "fraud_contract_warn": {"fleet.contract.mode": "warn", "fleet.contract.is_foreign": "in 0 1",
                                "fleet.contract.from_reference": "1"},
    }
    for name, params in models.items():
        repo.publish(name, {"model.pt": fraud_file}, {**fraud_metadata, "note": "fraud, for the monitoring tests"},
                     config=make_config(name, list(fraud_spec.inputs), list(fraud_spec.outputs), max_batch_size=256,
                                        max_queue_delay_us=1000, parameters={**preprocess, **params}))
    digits_spec = repo.spec("digits")
    repo.publish("digits_full", {"model.pt": (Path(repo.version("digits", 1).path) / "model.pt").read_bytes()},
                 repo.metadata("digits", 1),
                 config=make_config("digits_full", list(digits_spec.inputs), list(digits_spec.outputs),
                                    max_batch_size=64, max_queue_delay_us=1000,
                                    parameters={**digits_spec.parameters, "fleet.log.inputs": "full"}))


class WebhookReceiver:
    """An HTTP server of the test process that keeps every JSON body POSTed to it (the alert webhook)."""

    def __init__(self, port: int):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"body": json.loads(body), "authorization": self.headers.get("Authorization")})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rank(module: str) -> int:
    return 0 if module in QUIET_FIRST else 2 if module == JOBS_MODULE else 1


def pytest_collection_modifyitems(session, config, items):
    """Within this package's run: QUIET_FIRST, then the rest, then the training jobs' module (stable otherwise)."""
    ordered = order_folder(items, Path(__file__).parent, _rank)
    config.stash[_JOBS_WANTED] = any(_rank(module_name(item)) == 2 for item in ordered)


_JOBS_WANTED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _training_jobs_in_the_background(request):
    """The first test after QUIET_FIRST submits test_training_jobs.py's jobs (when that module is in the run)."""
    if request.config.stash.get(_JOBS_WANTED, False) and _rank(module_name(request.node)) != 0:
        request.getfixturevalue("training_jobs")


@pytest.fixture(scope="package")
def training_jobs(fleet_cluster, repository):
    """test_training_jobs.py's three Ray jobs, submitted (integration/_training_jobs.py); `.wait()` ends them."""
    from integration._training_jobs import TrainingJobs

    return TrainingJobs(fleet_cluster[0], repository)


@pytest.fixture(scope="package")
def repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="package")
def fleet_cluster(repository: Path, tmp_path_factory):
    """The running cluster: yields (settings, triton) and shuts both down afterwards.

    triton also holds "webhook": the WebhookReceiver the cluster's alert_webhook_url points at.
    """
    ports = free_ports(11)  # every port of the session, distinct, in one call
    triton_ports, fallback_ports = tuple(ports[0:3]), tuple(ports[3:6])  # fallback: test_triton_fallback.py's Triton
    _build_repository(repository, f"127.0.0.1:{triton_ports[0]}", f"127.0.0.1:{fallback_ports[0]}")
    webhook = WebhookReceiver(ports[8])
    token_file = tmp_path_factory.mktemp("secrets") / "webhook-token"
    token_file.write_text("webhook-secret-token\n")
    model_file = tmp_path_factory.mktemp("triton") / "fraud.pt"
    shutil.copy(repository / "fraud" / "1" / "model.pt", model_file)
    triton: dict = {"fallback_ports": fallback_ports, "webhook": webhook}

    def start_triton() -> None:
        try:
            triton["proc"] = TritonProcess.start(
                model_file, "fraud", inputs=[("features", "FP32", (30,))], outputs=[("probability", "FP32", (1,))],
                max_batch_size=256, ports=triton_ports,
            )
        except Exception as exc:  # reported by the test that needs it
            triton["error"] = exc

    starter = threading.Thread(target=start_triton)
    starter.start()
    settings = FleetSettings(
        repository=str(repository),
        port=ports[6],
        dashboard_port=ports[7],
        grpc_port=ports[9],
        state_dir=str(tmp_path_factory.mktemp("state")),
        ingress_replicas=2,
        # Five split worker replicas (fraud_failover has 2): 0.1 CPU each leaves one logical CPU free,
        # which a training job's Ray Data file listing task needs (it always asks for 1) beside the
        # 0.5 of the ingress.
        worker_num_cpus=0.1,
        max_request_bytes=1 << 20,
        response_cache_bytes=1 << 20,  # fraud_cached's answers (the other models do not enable the cache)
        max_batch_rows=200,  # below the models' 256: test_limits_live.py sends a batch between the two
        max_string_bytes=64 << 10,  # below the body limit: test_limits_live.py sends a longer string
        metrics_push_interval_s=0.5,
        startup_timeout_s=180,
        version_poll_interval_s=1.0,  # new versions are picked up sooner than the default 5 s
        data_dir=str(tmp_path_factory.mktemp("data")),  # the jobs' training data (FLEET_DATA_DIR), the log, labels
        train_storage=str(tmp_path_factory.mktemp("train")),  # their checkpoints (FLEET_TRAIN_STORAGE)
        log_flush_interval_s=0.5,  # log files appear within a second
        log_buffer_rows=20_000,  # test_monitoring_sink.py fills it
        monitor_interval_s=0.5,
        drift_window_rows=2_000,
        retrain_after_s=None,  # only fraud_loop retrains itself (its fleet.retrain.after_s)
        retrain_cooldown_s=3600,
        alert_webhook_url=webhook.url,
        alert_webhook_token_file=str(token_file),
        admin_token=ADMIN_TOKEN,
    )
    saved_env = dict(os.environ)
    cluster = LocalCluster(settings)
    agent = ports[10]
    try:
        for attempt in range(3):
            try:
                # Ray's dashboard agent on a port of its own too: beside another Ray cluster on this machine (make
                # test's pure-Python pass runs beside the e2e tests) its default, 52365, may be the other's.
                with ray_agent_port(agent):
                    cluster.start()
                break
            except Exception as exc:  # a port taken between choosing it and binding it: new ones, again
                cluster.stop()
                # (Ray's dashboard can also miss its start-up deadline on a loaded machine: try once more too.)
                if attempt == 2 or not (port_taken(exc) or "dashboard" in str(exc).lower()):
                    raise
                port, dashboard, grpc_port, agent = free_ports(4)
                settings = settings.model_copy(update={"port": port, "dashboard_port": dashboard,
                                                       "grpc_port": grpc_port})
                cluster = LocalCluster(settings)
        starter.join()
        if "proc" in triton:
            # The replicas start without waiting for a Triton that is not up yet (fraud_triton then
            # reads not ready): the tests start once every model is ready.
            cluster.wait_ready(120)
        yield settings, triton
    finally:
        starter.join()
        cluster.stop()
        webhook.stop()
        if "proc" in triton:
            triton["proc"].stop()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="package")
def base_url(fleet_cluster) -> str:
    return fleet_cluster[0].url


@pytest.fixture(scope="package")
def host_port(fleet_cluster) -> str:
    """The address as tritonclient wants it: host:port, no scheme."""
    s = fleet_cluster[0]
    return f"{s.host}:{s.port}"


@pytest.fixture(scope="package")
def grpc_address(fleet_cluster) -> str:
    """The cluster's KServe v2 gRPC address as tritonclient.grpc wants it: host:port."""
    s = fleet_cluster[0]
    return f"{s.host}:{s.grpc_port}"


@pytest.fixture(scope="package")
def repository_models(fleet_cluster, repository) -> ModelRepository:
    return ModelRepository(str(repository))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on loopback for the object-storage tests (integration/_s3.py)."""
    from integration._s3 import serve_s3

    yield from serve_s3(tmp_path_factory)
