"""The closed loop on a live cluster: an alarm that holds makes the monitor submit a retrain through the Jobs
SDK, and the version it publishes names the logged, labelled traffic it trained on.

`fraud_loop` sets `fleet.retrain.after_s: 2` (the cluster's default is off in the test cluster) and a
one-epoch, one-worker job.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from integration._monitoring import fraud_rows, infer_rows, metric_value, wait_until
from integration._training_jobs import write_example_data

pytestmark = pytest.mark.integration

MODEL = "fraud_loop"


def test_a_held_alarm_submits_one_retrain_whose_version_names_the_traffic_it_used(fleet_cluster, base_url,
                                                                                  repository_models):
    settings = fleet_cluster[0]
    # The jobs' example data, the file test_training_jobs.py's jobs read (whichever comes first writes it): a small
    # one, so that the job the monitor submits trains in seconds.
    write_example_data(Path(settings.data_dir))
    x, y = fraud_rows(6000, seed=51, scenario="covariate_shift")
    ids = [f"loop-{i}" for i in range(0, 6000, 50)]
    answers = infer_rows(base_url, MODEL, x, rows_per_request=50, ids=ids, fresh_connections=False)
    assert all(a["status"] == 200 for a in answers)
    labels = [{"id": rid, "label": [int(v) for v in y[k * 50:(k + 1) * 50]]} for k, rid in enumerate(ids)]
    r = httpx.post(f"{base_url}/v2/models/{MODEL}/feedback", json={"labels": labels}, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == 6000
    audit = Path(settings.data_dir) / "audit" / "monitor.jsonl"

    def submitted():
        if not audit.exists():
            return None
        events = [json.loads(line) for line in audit.read_text().splitlines()]
        return [e for e in events if e["event"] == "retrain_submitted" and e["model"] == MODEL] or None

    record = wait_until(submitted, 30, what="the monitor's retrain submission")[0]
    assert record["version"] == 1 and record["job"].startswith("raysubmit_")
    assert "--publish-as fraud_loop" in record["entrypoint"] and "--model fraud" in record["entrypoint"]
    evidence = record["evidence"]
    assert evidence["held_s"] >= 2 and evidence["alarms"] and all(a["version"] == 1 for a in evidence["alarms"])

    # The job trains and publishes version 2, which names the traffic and labels it was trained on.
    metadata_file = Path(repository_models.root) / MODEL / "2" / "metadata.json"
    wait_until(metadata_file.exists, 300, what="version 2 published by the retrain job")
    metadata = json.loads(metadata_file.read_text())
    traffic = metadata["training_data"]["traffic"]
    logged = sorted(str(p) for p in (Path(settings.data_dir) / "traffic" / MODEL).rglob("*.parquet"))
    assert traffic["traffic_files"] and set(traffic["traffic_files"]) <= set(logged)
    assert traffic["label_files"] and traffic["joined_rows"] >= 6000 * 0.9  # those written by the time it read
    assert metadata["ray_job"]["submission_id"] == record["job"]
    # The job ended and was recorded once; no second job within the cooldown.
    wait_until(lambda: any(json.loads(line)["event"] in ("retrain_succeeded", "retrain_failed")
                           for line in audit.read_text().splitlines()), 60, what="the job's end in the audit")
    events = [json.loads(line) for line in audit.read_text().splitlines() if MODEL in line]
    assert [e["event"] for e in events if e["event"].startswith("retrain_")] == ["retrain_submitted",
                                                                                 "retrain_succeeded"]
    metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert metric_value(metrics, "fleet_retrain_jobs_total", model=MODEL, outcome="submitted") == 1.0
    assert metric_value(metrics, "fleet_retrain_jobs_total", model=MODEL, outcome="succeeded") == 1.0
