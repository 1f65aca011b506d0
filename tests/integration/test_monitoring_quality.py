"""Feedback on a live cluster: labels by request id, joined to the log; online quality equal to sklearn's."""

from __future__ import annotations

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from sklearn.metrics import roc_auc_score

from integration._monitoring import fraud_rows, infer_rows, metric_value, read_log, wait_until

pytestmark = pytest.mark.integration


def _quality(base_url: str, model: str) -> dict:
    r = httpx.get(f"{base_url}/v2/models/{model}/quality", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _joined_on_disk(data_dir: str, model: str) -> pa.Table:
    """The log joined with its labels as a user would do it (the last label of an (id, row) wins)."""
    log = read_log(data_dir, model, ["request_id", "row", "probability"])
    labels = ds.dataset(f"{data_dir}/labels/{model}", format="parquet", partitioning="hive").to_table(
        columns=["request_id", "row", "label", "received_at"])
    labels = labels.sort_by([("received_at", "ascending")])
    labels = labels.append_column("order", pa.array(np.arange(labels.num_rows)))
    last = labels.group_by(["request_id", "row"], use_threads=False).aggregate([("order", "max")])
    labels = labels.take(last["order_max"])
    return log.join(labels, keys=["request_id", "row"], join_type="inner", use_threads=False)  # threaded: segfaulted once


def test_labels_join_their_predictions_and_the_online_auc_is_sklearns(fleet_cluster, base_url):
    settings = fleet_cluster[0]
    x, y = fraud_rows(4000, seed=21)
    # The first 500 labels come before their predictions exist; the rest after.
    early = [{"id": f"q-{i}", "label": int(y[i])} for i in range(500)]
    r = httpx.post(f"{base_url}/v2/models/fraud_log/feedback", json={"labels": early}, timeout=30)
    assert r.status_code == 200 and r.json() == {"model_name": "fraud_log", "accepted": 500, "duplicates": 0,
                                                 "task": "binary"}
    ids = [f"q-{i}" for i in range(4000)]
    answers = infer_rows(base_url, "fraud_log", x, ids=ids, fresh_connections=False)
    assert all(a["status"] == 200 for a in answers)
    # The rest as the v2 tensor form, with a duplicate: the same id twice, the last one wins.
    late_ids = ids[500:] + ["q-600"]
    late_labels = [int(v) for v in y[500:]] + [1 - int(y[600])]
    tensors = {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [len(late_ids)], "data": late_ids},
                          {"name": "label", "datatype": "INT64", "shape": [len(late_ids)], "data": late_labels}]}
    r = httpx.post(f"{base_url}/v2/models/fraud_log/feedback", json=tensors, timeout=30)
    assert r.status_code == 200 and r.json()["accepted"] == 3500 and r.json()["duplicates"] == 1
    y_seen = y.copy()
    y_seen[600] = 1 - y[600]

    def joined_all():
        q = _quality(base_url, "fraud_log")
        v = q["versions"].get("1")
        return v if v and v["labelled"] >= 4000 else None

    v = wait_until(joined_all, 30, what="4000 labels joined")
    on_disk = _joined_on_disk(settings.data_dir, "fraud_log")
    auc = roc_auc_score(on_disk["label"].to_numpy(), on_disk["probability"].to_numpy())
    window = v["rows"]
    assert window["rows"] == on_disk.num_rows  # every labelled prediction of this model is in the window
    assert abs(window["roc_auc"] - auc) <= 0.001, (window["roc_auc"], auc)
    assert window["roc_auc"] == pytest.approx(roc_auc_score(
        y_seen, np.concatenate([a["outputs"][:, 0] for a in answers])), abs=0.001)
    accuracy = float(np.mean((on_disk["probability"].to_numpy() >= 0.5) == (on_disk["label"].to_numpy() == 1)))
    assert window["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert window["label_error_rate"] == pytest.approx(1 - accuracy, abs=1e-9)
    assert 0.0 <= window["calibration_error"] < 0.05  # the example model is calibrated (its logit offset)
    assert v["time"]["rows"] == window["rows"]  # all within the last hour
    assert v["reference"]["roc_auc"] > 0.8 and v["label_error"]["state"] == "ok"
    labels = _quality(base_url, "fraud_log")["labels"]
    assert labels["pending"] == 0 and labels["duplicates"] >= 0
    metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert metric_value(metrics, "fleet_quality_roc_auc", model="fraud_log", version="1", window="rows") == \
        pytest.approx(window["roc_auc"], abs=1e-9)
    assert metric_value(metrics, "fleet_feedback_duplicates_total", model="fraud_log") >= 1
    assert metric_value(metrics, "fleet_feedback_labels_total", model="fraud_log") >= 4000


@pytest.mark.parametrize("body, status, says", [
    ({"labels": [{"id": "a", "label": 2}]}, 400, "label must be 0 or 1 for model 'fraud_log' (binary), got 2"),
    ({"labels": [{"id": "a", "label": 0.5}]}, 400, "got 0.5"),
    ({"labels": [{"id": "a", "label": "1"}]}, 400, "got '1'"),
    ({"labels": [{"id": "a", "label": [1, 2]}]}, 400, "labels[0].label[1]"),
    ({"labels": [{"id": 7, "label": 1}]}, 400, "'id' must be a non-empty string"),
    ({"labels": [{"id": "a", "label": 1, "extra": 1}]}, 400, "unknown field(s) ['extra']"),
    ({"labels": []}, 400, "non-empty list"),
    ({"inputs": [{"name": "id", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
                 {"name": "label", "datatype": "FP32", "shape": [2], "data": [1.0, 0.0]}]}, 400,
     "must be an integer or BOOL tensor"),
    ({"inputs": [{"name": "id", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
                 {"name": "label", "datatype": "INT64", "shape": [3], "data": [1, 0, 1]}]}, 400, "must have shape [2]"),
    ({"nothing": 1}, 400, "needs 'labels'"),
])
def test_bad_feedback_is_a_4xx_that_says_what_is_wrong(base_url, body, status, says):
    r = httpx.post(f"{base_url}/v2/models/fraud_log/feedback", json=body, timeout=30)
    assert r.status_code == status and says in r.json()["error"], r.text


def test_feedback_for_an_unknown_model_is_404_and_malformed_json_400(base_url):
    r = httpx.post(f"{base_url}/v2/models/no_such_model/feedback", json={"labels": [{"id": "a", "label": 1}]})
    assert r.status_code == 404
    r = httpx.post(f"{base_url}/v2/models/fraud_log/feedback", content=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
