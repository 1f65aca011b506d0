"""The three Ray jobs of test_training_jobs.py: their data, their submission, and the wait for their end.

They are submitted once per session by the `training_jobs` fixture of conftest.py, as soon as the tests that
time the cluster (conftest.QUIET_FIRST) have run, at nice 19 (`train_nice`), so that they train on the CPU the
rest of the integration tests leave idle; test_training_jobs.py runs last and only waits for what is left of
them.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import numpy as np

from cluster.jobs import auth_env, job_runtime_env, submit, train_entrypoint
from training.datasets import load_digits, make_fraud, write_fraud_parquet
from unit._traffic_helpers import T0, log_digits, log_fraud, write_labels

JOB_TIMEOUT_S = 900  # from the submission: the jobs share the machine with the other tests
NICE = 19  # the jobs take the CPU the other tests leave idle (training/priority.py), as beside serving
COMMON = ["--cpus-per-worker", "0.2", "--use-gpu", "auto"]
JOBS = {
    "retrain": ("fraud", "fraud_jobs", False, ["--num-workers", "2", "--epochs", "2", "--fail-at-epoch", "2"]),
    # The tuned candidate is forced out by its gate (--tolerance -1): the same job shows a rejected version.
    "tune": ("fraud", "fraud_tune", True, ["--num-samples", "2", "--max-epochs", "2", "--grace-period", "1",
                                           "--num-workers", "1", "--max-concurrent", "1", "--tolerance", "-1"]),
    "digits": ("digits", "digits_jobs", False, ["--num-workers", "1", "--epochs", "8", "--min-traffic-holdout", "100"]),
}
SHIFTED_ROWS = 10_000  # labelled fraud_jobs traffic: a traffic holdout of ~2,000 rows with ~20 frauds
INVERTED_IMAGES = 700


def write_example_data(data: Path) -> None:
    """The jobs' example data (test_monitoring_retrain.py's retrain reads the same file): written once."""
    example = data / "fraud" / "example.parquet"
    if not example.exists():
        write_fraud_parquet(str(example), 5000, seed=3)


def write_traffic(data: Path, repository: Path) -> dict:
    """fraud_jobs' and digits_jobs' logged traffic and labels (and a digits_jobs v1, a copy of digits v1)."""
    x, y = make_fraud(SHIFTED_ROWS, seed=4, scenario="concept_shift")
    ids = log_fraud(data, "fraud_jobs", x, prefix="shift")
    unlabelled = log_fraud(data, "fraud_jobs", x[:300], prefix="unlabelled")
    hashed = log_fraud(data, "fraud_jobs", x[:50], prefix="hashed", redact="amount=hash")
    write_labels(data, "fraud_jobs", ids + hashed, np.r_[y, y[:50]])
    digits = load_digits(seed=5)
    images = [np.kron(255 - im, np.ones((2, 2), np.uint8)) for im in digits.x_train[:INVERTED_IMAGES]]
    image_ids = log_digits(data, "digits_jobs", images, prefix="inverted")
    by_hash = log_digits(data, "digits_jobs", images[:20], prefix="by-hash", full=False)
    write_labels(data, "digits_jobs", image_ids + by_hash, np.r_[digits.y_train[:INVERTED_IMAGES], digits.y_train[:20]],
                 at=T0 + timedelta(hours=2))
    from serving.registry import ModelRepository
    from training.digits import digits_config

    repo = ModelRepository(str(repository))
    config = digits_config()
    config.name = "digits_jobs"
    repo.publish("digits_jobs", {"model.pt": (repository / "digits" / "1" / "model.pt").read_bytes()},
                 repo.metadata("digits", 1), config=config)
    return {"unlabelled": len(unlabelled), "hashed": len(hashed)}


class TrainingJobs:
    """The three jobs, submitted at once through `JobSubmissionClient` (the way `fleet train` and `ray job submit`
    do, working dir = this checkout) to run side by side."""

    def __init__(self, settings, repository: Path):
        data = Path(settings.data_dir)
        write_example_data(data)
        write_traffic(data, repository)
        auth_env()
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(settings.dashboard_url)
        self.submitted: dict[str, str] = {}
        for name, (model, target, tune, flags) in JOBS.items():
            entrypoint = train_entrypoint(model, tune=tune, extra=["--publish-as", target, *COMMON, *flags])
            self.submitted[name] = submit(self.client, attempts=8, entrypoint=entrypoint,  # a busy machine
                                          runtime_env=job_runtime_env(nice=NICE))
        self.deadline = time.monotonic() + JOB_TIMEOUT_S
        self._ended: dict | None = None

    def wait(self) -> dict:
        """Wait for them all: {name: (job id, status, logs)}; a job still running at the deadline is stopped."""
        if self._ended is not None:
            return self._ended
        client, out = self.client, {}
        while len(out) < len(self.submitted) and time.monotonic() < self.deadline:
            for name, job_id in self.submitted.items():
                status = str(client.get_job_status(job_id).value)
                if name not in out and status in ("SUCCEEDED", "FAILED", "STOPPED"):
                    out[name] = (job_id, status, client.get_job_logs(job_id))
            time.sleep(0.5)
        for name, job_id in self.submitted.items():
            if name not in out:
                client.stop_job(job_id)
                out[name] = (job_id, "TIMEOUT", client.get_job_logs(job_id))
            info = client.get_job_info(job_id)
            if info.start_time and info.end_time:  # (shown with -s: where the jobs' time goes)
                print(f"job {name}: {(info.end_time - info.start_time) / 1000:.0f} s")
        self._ended = out
        return out
