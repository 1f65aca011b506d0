"""Training as Ray jobs on the test cluster's real job server: retrain (with a worker killed), tune, a rejected one.

The three jobs are submitted at once through `JobSubmissionClient` (the way
`fleet train` and `ray job submit` do, working dir = this checkout) and run
side by side; each publishes into its own copy of fraud (fraud_jobs,
fraud_tune, fraud_reject) so the other tests' models stay as they are. The
gate's outcome is forced with `--tolerance` (1: accept, -1: reject) so the
serving checks do not depend on which of two small models trains better.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cluster.jobs import PROJECT_ROOT, auth_env, submit, train_entrypoint
from training.datasets import make_fraud, write_fraud_parquet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # the first test waits for the jobs

JOB_TIMEOUT_S = 420
COMMON = ["--cpus-per-worker", "0.2", "--use-gpu", "auto"]
JOBS = {
    "retrain": ("fraud_jobs", False, ["--num-workers", "2", "--epochs", "2", "--fail-at-epoch", "2",
                                      "--tolerance", "1"]),
    "tune": ("fraud_tune", True, ["--num-samples", "4", "--max-epochs", "2", "--grace-period", "1",
                                  "--num-workers", "1", "--max-concurrent", "1", "--tolerance", "1"]),
    "reject": ("fraud_reject", False, ["--num-workers", "1", "--epochs", "1", "--tolerance", "-1"]),
}


@pytest.fixture(scope="module")
def jobs(fleet_cluster, repository):
    """Write the data, submit the three jobs, wait for them all: {name: (job id, status, logs)}."""
    settings = fleet_cluster[0]
    data = Path(settings.data_dir)
    write_fraud_parquet(str(data / "fraud" / "example.parquet"), 5000, seed=3)
    write_fraud_parquet(str(data / "traffic" / "fraud" / "logged-0001.parquet"), 1000, seed=4)  # labelled traffic
    auth_env()
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(settings.dashboard_url)
    submitted = {}
    for name, (target, tune, flags) in JOBS.items():
        entrypoint = train_entrypoint("fraud", tune=tune, extra=["--publish-as", target, *COMMON, *flags])
        submitted[name] = submit(client, entrypoint=entrypoint, runtime_env={"working_dir": str(PROJECT_ROOT)})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    out = {}
    while len(out) < len(submitted) and time.monotonic() < deadline:
        for name, job_id in submitted.items():
            status = str(client.get_job_status(job_id).value)
            if name not in out and status in ("SUCCEEDED", "FAILED", "STOPPED"):
                out[name] = (job_id, status, client.get_job_logs(job_id))
        time.sleep(2)
    for name, job_id in submitted.items():
        if name not in out:
            client.stop_job(job_id)
            out[name] = (job_id, "TIMEOUT", client.get_job_logs(job_id))
    return out


def _succeeded(jobs, name: str) -> str:
    job_id, status, logs = jobs[name]
    assert status == "SUCCEEDED", f"job {name} ({job_id}) ended {status}:\n{logs[-6000:]}"
    return logs


def _wait_for_version(base_url: str, model: str, version: str, timeout_s: float = 30.0) -> float:
    started = time.monotonic()
    x, _ = make_fraud(1, seed=9)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}]}
    while time.monotonic() - started < timeout_s:
        r = httpx.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        if r.json()["model_version"] == version:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{model} still answers {r.json()['model_version']} {timeout_s:.0f} s after its job ended")


def _served_output(base_url: str, repository: Path, model: str, version: int, x: np.ndarray) -> tuple:
    from serving.registry import ModelRepository
    from training.preprocess_reference import standardize

    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    r = httpx.post(f"{base_url}/v2/models/{model}/versions/{version}/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    served = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(-1, 1)
    repo = ModelRepository(str(repository))
    z = standardize(x, repo.metadata(model, version), float(repo.spec(model).parameters["preprocess.clip"]))
    with torch.inference_mode():
        direct = torch.jit.load(str(repository / model / str(version) / "model.pt"))(torch.from_numpy(z)).numpy()
    return served, direct


def test_retrain_job_survives_a_killed_worker_and_its_version_is_served(jobs, base_url, repository):
    logs = _succeeded(jobs, "retrain")
    assert "[fault injection] worker rank 1 exits hard in epoch 2" in logs
    assert "resuming from the checkpoint of epoch 1" in logs  # not from scratch
    assert "epoch 2/2" in logs and "ETA" in logs
    assert "published fraud_jobs version 2 (accepted" in logs
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_jobs", 2)
    assert meta["gate"] == "accepted" and meta["parent_version"] == 1 and meta["serving_version"] == 1
    data = meta["training_data"]
    assert data["example_files"] == 1 and data["traffic_files"] == 1  # logged traffic is read too
    assert data["rows"]["total"] == 6000 and len(data["sha256"]) == 64
    assert data["rows"]["train"] + data["rows"]["validation"] + data["rows"]["holdout"] == 6000
    assert {"loss", "accuracy", "roc_auc"} <= set(meta["metrics"]) and 0.5 < meta["metrics"]["roc_auc"] <= 1.0
    assert {"loss", "accuracy", "roc_auc"} <= set(meta["serving_metrics"])
    assert meta["params"]["epochs"] == 2 and meta["training"]["num_workers"] == 2
    assert meta["training"]["fault_injected"] is True and meta["training"]["best_epoch"] in (1, 2)
    assert meta["ray_job"]["submission_id"] == jobs["retrain"][0]
    stats = meta["reference_stats"]["amount"]
    assert len(stats["edges"]) == len(stats["counts"]) + 1 and sum(stats["counts"]) == data["rows"]["train"]
    assert meta["created_at"] and "git_sha" in meta

    took = _wait_for_version(base_url, "fraud_jobs", "2")
    assert took < 30
    x, _ = make_fraud(16, seed=11)
    served, direct = _served_output(base_url, repository, "fraud_jobs", 2, x)
    np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-6)  # the new file answers, standardized its way


def test_tune_job_stops_trials_early_and_publishes_the_best(jobs, base_url, repository):
    logs = _succeeded(jobs, "tune")
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_tune", 2)
    record = meta["training"]
    assert record["num_samples"] == 4 and len(record["trials"]) == 4
    assert record["stopped_early"] >= 1, record["trials"]  # ASHA cut some at the first rung
    assert any(t["epochs"] == 2 for t in record["trials"])  # and let the best run on
    best = min(t["best_val_loss"] for t in record["trials"] if t["best_val_loss"] is not None)
    assert meta["training"]["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert "stopped early by ASHA" in logs and "published fraud_tune version 2" in logs
    _wait_for_version(base_url, "fraud_tune", "2")


def test_rejected_candidate_is_published_but_never_served(jobs, base_url, repository):
    logs = _succeeded(jobs, "reject")
    assert "published fraud_reject version 2 (rejected" in logs
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_reject", 2)
    assert meta["gate"] == "rejected" and "holdout ROC AUC" in meta["gate_reason"]
    time.sleep(4)  # well past the test cluster's 1 s poll and 2 s refresh
    x, _ = make_fraud(1, seed=9)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}]}
    for _ in range(5):
        r = httpx.post(f"{base_url}/v2/models/fraud_reject/infer", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
    refused = httpx.post(f"{base_url}/v2/models/fraud_reject/versions/2/infer", json=body, timeout=10)
    assert 400 <= refused.status_code < 500 and "version 2" in refused.json()["error"]
