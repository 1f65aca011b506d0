"""Training as Ray jobs on the test cluster's real job server: retrain on labelled traffic after a concept shift
(with a worker killed), tune (its candidate rejected by the gate), and digits on logged images.

The three jobs (integration/_training_jobs.py) are submitted at once through
`JobSubmissionClient` (the way `fleet train` and `ray job submit` do, working
dir = this checkout) and run side by side while the other integration tests
run (conftest.py submits them; this module runs last and waits). Each
publishes into its own copy of a served model (fraud_jobs, fraud_tune,
digits_jobs) so the other tests' models stay as they are. The
traffic is written by the serving side's prediction-log writer and labelled in
the feedback layout: fraud_jobs' follows `concept_shift`, so its retrain is
accepted on the traffic holdout on its merits; digits_jobs' is inverted 16 x 16
digits. The tune job has no traffic; its gate is forced to reject with
`--tolerance -1` (an accepted version taking over is shown by the other two and
by tests/e2e/test_cli.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from integration._training_jobs import INVERTED_IMAGES, SHIFTED_ROWS
from training.datasets import load_digits, make_fraud

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # the first test waits for what is left of the jobs


@pytest.fixture(scope="module")
def jobs(training_jobs) -> dict:
    """{name: (job id, status, logs)} once all three have ended."""
    return training_jobs.wait()


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


def test_retrain_on_shifted_traffic_survives_a_killed_worker_and_wins_on_the_traffic_holdout(jobs, base_url,
                                                                                             repository):
    logs = _succeeded(jobs, "retrain")
    assert "[fault injection] worker rank 1 exits hard in epoch 2" in logs
    assert "resuming from the checkpoint of epoch 1" in logs  # not from scratch
    assert "epoch 2/2" in logs and "ETA" in logs
    # Every process of the job at the niceness it was submitted with: the driver, and the Ray Train worker
    # that prints the epochs (reniced by the job's setup hook).
    assert "CPU priority: nice 19" in logs and re.search(r"epoch 2/2: [^\n]*; nice 19", logs), logs[-3000:]
    assert f"joined {SHIFTED_ROWS} labelled row(s)" in logs and "amount redacted" in logs
    assert "published fraud_jobs version 2 (accepted" in logs
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_jobs", 2)
    assert meta["gate"] == "accepted" and meta["parent_version"] == 1 and meta["serving_version"] == 1
    # Judged on recent traffic, where the version trained before the shift is lost.
    assert meta["gate_holdout"] == "traffic" and meta["gate_reason"].startswith("traffic holdout ROC AUC")
    recent = meta["holdouts"]["traffic"]
    assert recent["candidate"]["roc_auc"] > recent["serving"]["roc_auc"] + 0.1, recent
    assert {"loss", "accuracy", "roc_auc"} <= set(meta["holdouts"]["example"]["serving"])
    # The version is published with the traffic it used named in its metadata.
    data = meta["training_data"]
    traffic = data["traffic"]
    assert data["example_files"] == 1 and data["traffic_files"] == 2 and data["label_files"] == 1
    assert all(f in data["files"] for f in traffic["traffic_files"] + traffic["label_files"])
    assert all("/traffic/fraud_jobs/version=1/date=2026-03-02/" in f for f in traffic["traffic_files"])
    assert traffic["joined_rows"] == SHIFTED_ROWS and traffic["unlabelled_predictions"] == 300
    assert traffic["by_version"]["1"]["rows"] == SHIFTED_ROWS and traffic["by_version"]["1"]["first_date"] == \
        "2026-03-02"
    (skipped,) = traffic["skipped_files"]
    assert skipped["rows"] == 50 and "redacted" in skipped["reason"]
    rows = data["rows"]
    assert rows["total"] == 5000 + SHIFTED_ROWS and rows["traffic"]["holdout"] == recent["rows"]
    assert rows["train"] + rows["validation"] + rows["holdout"] == rows["total"]
    assert data["row_weights"] == {"example": 1.0, "traffic": 1.0}  # traffic is already most of the rows
    assert meta["params"]["epochs"] == 2 and meta["training"]["num_workers"] == 2
    assert meta["training"]["fault_injected"] is True and meta["training"]["best_epoch"] in (1, 2)
    assert meta["ray_job"]["submission_id"] == jobs["retrain"][0]
    # Its drift reference is the newest labelled traffic (the world it was retrained for), not the old example
    # rows: each feature's histogram and the score's of the traffic's held-out rows.
    assert data["drift_reference"] == {"from": "the newest labelled traffic", "rows": SHIFTED_ROWS}
    stats = meta["reference_stats"]["amount"]
    assert len(stats["edges"]) == len(stats["counts"]) + 1 and sum(stats["counts"]) == SHIFTED_ROWS
    assert meta["monitoring"]["scores"]["rows"] == recent["rows"] and "pca" in meta["monitoring"]
    assert set(meta["monitoring"]["scores_by_label"]) == {"0", "1"}
    assert meta["created_at"] and "git_sha" in meta

    took = _wait_for_version(base_url, "fraud_jobs", "2")
    assert took < 30
    x, _ = make_fraud(16, seed=11)
    served, direct = _served_output(base_url, repository, "fraud_jobs", 2, x)
    np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-6)  # the new file answers, standardized its way


def test_digits_job_learns_the_logged_images_and_is_accepted_on_them(jobs, repository):
    logs = _succeeded(jobs, "digits")
    assert "epoch 8/8" in logs and "published digits_jobs version 2 (accepted" in logs
    assert "fleet.log.inputs: full" in logs  # the file logged by hash only was skipped, and said so
    from serving.registry import ModelRepository

    repo = ModelRepository(str(repository))
    meta = repo.metadata("digits_jobs", 2)
    assert meta["gate"] == "accepted" and meta["gate_holdout"] == "traffic" and meta["serving_version"] == 1
    recent = meta["holdouts"]["traffic"]
    assert recent["serving"]["accuracy"] < 0.3 and recent["candidate"]["accuracy"] > 0.7, recent
    traffic = meta["training_data"]["traffic"]
    assert traffic["joined_rows"] == INVERTED_IMAGES and traffic["image_sizes"] == {"16x16": INVERTED_IMAGES}
    assert len(traffic["traffic_files"]) == 1 and len(traffic["skipped_files"]) == 1
    assert meta["monitoring"]["scores"]["output"] == "probabilities" and "pca" not in meta["monitoring"]
    assert meta["params"]["trainer"] == "ray.train.torch.TorchTrainer" and meta["params"]["epochs"] == 8
    # The published file answers inverted 16 x 16 digits as the server will feed them.
    from training.digits import evaluate_digits, normalize_digits

    digits = load_digits(seed=5)
    fresh = np.stack([np.kron(255 - im, np.ones((2, 2), np.uint8)) for im in digits.x_holdout])
    model = torch.jit.load(str(repository / "digits_jobs" / "2" / "model.pt"))
    assert evaluate_digits(model, normalize_digits(fresh), digits.y_holdout)["accuracy"] > 0.7


def test_tune_job_stops_trials_early_and_publishes_the_best(jobs, base_url, repository):
    logs = _succeeded(jobs, "tune")
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_tune", 2)
    record = meta["training"]
    assert record["num_samples"] == 2 and len(record["trials"]) == 2 and record["max_concurrent"] == 1
    # One trial at a time (--max-concurrent 1), in the seeded order: the second (lr 4e-3, batches of 512, 32 wide)
    # is far behind the first at the first rung (validation loss 1.36-1.38 against 1.20 in three runs alone), so
    # ASHA cuts it there and lets the first run on. (With the limit ignored, the trials started at once and the
    # order they reached the rung in decided whether any was cut.)
    first, second = sorted(record["trials"], key=lambda t: t["started_at"])
    assert second["config"]["batch_size"] == 512 and second["stopped_early"] and second["epochs"] == 1, record
    assert not first["stopped_early"] and first["epochs"] == 2 and record["stopped_early"] == 1, record
    # Trials running when each one started (itself included); Tune's timestamps are whole seconds, and a trial
    # ends a little after its last report: 2 s of slack.
    overlap = max(sum(t["started_at"] <= s["started_at"] < t["ended_at"] - 2 or t is s for t in record["trials"])
                  for s in record["trials"])
    assert overlap == 1, record["trials"]
    best = min(t["best_val_loss"] for t in record["trials"] if t["best_val_loss"] is not None)
    assert meta["training"]["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert "stopped early by ASHA" in logs


def test_rejected_candidate_is_published_but_never_served(jobs, base_url, repository):
    logs = _succeeded(jobs, "tune")
    assert "published fraud_tune version 2 (rejected" in logs
    from serving.registry import ModelRepository

    meta = ModelRepository(str(repository)).metadata("fraud_tune", 2)
    assert meta["gate"] == "rejected" and "holdout ROC AUC" in meta["gate_reason"]
    time.sleep(4)  # well past the test cluster's 1 s poll and 2 s refresh
    x, _ = make_fraud(1, seed=9)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}]}
    for _ in range(5):
        r = httpx.post(f"{base_url}/v2/models/fraud_tune/infer", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
    refused = httpx.post(f"{base_url}/v2/models/fraud_tune/versions/2/infer", json=body, timeout=10)
    assert 400 <= refused.status_code < 500 and "version 2" in refused.json()["error"]
