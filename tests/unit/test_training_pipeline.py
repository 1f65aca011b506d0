"""The training job's pieces without Ray: data sources and fingerprints, the hash split, the gate, publishing."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.jobs import train_entrypoint
from serving.registry import ModelRepository
from training.artifacts import export_torchscript
from training.bootstrap import FRAUD_FEATURES, TrainParams, fit_fraud, reference_stats
from _traffic_helpers import log_fraud, write_labels
from training.data import (check_example_files, ensure_example_data, example_files, find_sources, fraud_traffic,
                           source_weights, split_buckets, to_training_batch)
from training.datasets import load_digits, make_fraud, write_digits_parquet
from training.publish import gate, publish_candidate, resolve_repository


def test_split_buckets_follow_the_row_not_its_position():
    x, _ = make_fraud(40_000, seed=2)
    buckets = split_buckets(x)
    order = np.random.default_rng(0).permutation(len(x))
    np.testing.assert_array_equal(split_buckets(x[order]), buckets[order])
    assert buckets.min() >= 0 and buckets.max() <= 99
    holdout = np.mean(buckets < 20)
    assert 0.19 < holdout < 0.21  # about a fifth of the rows, whatever the data


def test_sources_write_the_example_data_and_fingerprint_every_file(tmp_path):
    sources = find_sources(tmp_path, "fraud")
    assert len(sources.example) == 1 and sources.traffic == () and sources.labels == ()
    assert pq.read_metadata(sources.example[0]).num_rows == 40_000
    first = sources.describe()
    path = sources.example[0]
    assert first["files"][path] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    ids = log_fraud(tmp_path, "fraud", make_fraud(50, seed=8)[0])
    label_file = write_labels(tmp_path, "fraud", ids, np.zeros(50))
    joined, _, _ = fraud_traffic(tmp_path, "fraud")
    again = find_sources(tmp_path, "fraud", joined).describe()
    assert (again["example_files"], again["traffic_files"], again["label_files"]) == (1, 1, 1)
    assert again["sha256"] != first["sha256"] and str(label_file) in again["files"]
    assert find_sources(tmp_path, "fraud").describe()["sha256"] == first["sha256"]
    assert ensure_example_data(tmp_path) == str(tmp_path / "fraud" / "fraud-baseline-seed0-40000.parquet")


def test_example_files_without_the_columns_stop_the_job_with_a_readable_message(tmp_path):
    (tmp_path / "fraud").mkdir()
    pq.write_table(pa.table({"amount": [1.0], "label": [0]}), tmp_path / "fraud" / "mine.parquet")
    with pytest.raises(SystemExit, match=r"mine.parquet lacks the columns \['hour', "):
        check_example_files(example_files(tmp_path), [*FRAUD_FEATURES, "label"])
    (tmp_path / "fraud" / "mine.parquet").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not a readable parquet file"):
        check_example_files(example_files(tmp_path), [*FRAUD_FEATURES, "label"])


def test_traffic_rows_weigh_at_least_their_share_of_the_loss():
    assert source_weights(8000, 2000, 0.5) == (0.625, 2.5)  # 2000 * 2.5 = 8000 * 0.625: half each, mean 1
    assert source_weights(1000, 3000, 0.5) == (1.0, 1.0)  # already more than half
    assert source_weights(8000, 0, 0.5) == (1.0, 1.0) and source_weights(0, 50, 0.9) == (1.0, 1.0)
    example_w, traffic_w = source_weights(9000, 1000, 0.25)
    assert 1000 * traffic_w / (1000 * traffic_w + 9000 * example_w) == pytest.approx(0.25)
    assert source_weights(9000, 1000, 0.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        source_weights(10, 10, 1.5)


def test_parquet_rows_become_training_batches_or_a_clear_error():
    x, y = make_fraud(10, seed=1)
    batch = {name: x[:, i] for i, name in enumerate(FRAUD_FEATURES)} | {"label": y}
    out = to_training_batch(batch)
    np.testing.assert_array_equal(out["features"], x)
    np.testing.assert_array_equal(out["label"], y.astype(np.float32))
    np.testing.assert_array_equal(out["bucket"], split_buckets(x))
    assert (out["traffic"] == 0).all() and (to_training_batch(batch, traffic=True)["traffic"] == 1).all()
    with pytest.raises(ValueError, match="lack the columns \\['amount'\\]"):
        to_training_batch({k: v for k, v in batch.items() if k != "amount"})
    with pytest.raises(ValueError, match="0 or 1"):
        to_training_batch(batch | {"label": y + 2})


def test_gate_compares_holdout_auc_within_the_tolerance():
    serving = {"roc_auc": 0.95, "loss": 0.04}
    assert gate({"roc_auc": 0.951, "loss": 0.05}, None)[0] == "accepted"
    assert gate({"roc_auc": 0.949, "loss": 0.05}, serving, 0.002)[0] == "accepted"
    verdict, why = gate({"roc_auc": 0.94, "loss": 0.03}, serving, 0.002)
    assert verdict == "rejected" and "0.9400 vs 0.9500" in why
    assert gate({"roc_auc": 0.96, "loss": 0.03}, serving, -0.02)[0] == "rejected"  # must improve by 0.02
    assert gate({"roc_auc": None, "loss": 0.05}, {"roc_auc": None, "loss": 0.04})[0] == "rejected"


def test_repository_must_be_absolute_for_a_job(monkeypatch):
    monkeypatch.delenv("FLEET_REPOSITORY", raising=False)
    with pytest.raises(SystemExit, match="no repository"):
        resolve_repository(None)
    with pytest.raises(SystemExit, match="is relative"):
        resolve_repository("model_repository")
    monkeypatch.setenv("FLEET_REPOSITORY", "/srv/models")
    assert resolve_repository(None) == "/srv/models"
    assert resolve_repository("s3://bucket/models") == "s3://bucket/models"


def test_train_entrypoint_is_a_quoted_command_line():
    line = train_entrypoint("fraud", tune=True, extra=["--num-samples", "8", "--publish-as", "a b"])
    assert line == "python -m training.tune --model fraud --num-samples 8 --publish-as 'a b'"


@pytest.mark.parametrize("flag", ["--num-samples", "--max-epochs", "--max-concurrent"])
def test_tune_refuses_a_search_of_no_trials_epochs_or_concurrency(flag, capsys):
    from training import tune

    with pytest.raises(SystemExit) as stop:
        tune.main(["--model", "fraud", flag, "0"])
    assert stop.value.code == 2
    assert "--max-concurrent must be >= 1" in capsys.readouterr().err


def test_digits_parquet_holds_the_images_a_client_sends(tmp_path):
    path = write_digits_parquet(str(tmp_path / "digits.parquet"), seed=0)
    table = pq.read_table(path).to_pydict()
    split = load_digits(seed=0)
    assert len(table["label"]) == 1797 and table["split"].count("holdout") == len(split.y_holdout)
    np.testing.assert_array_equal(np.asarray(table["image"][0], np.uint8), split.x_train[0])


def _candidate(x, y, epochs: int) -> tuple[bytes, dict]:
    model = fit_fraud(x, y, TrainParams(epochs=epochs, hidden=16), seed=0)
    pos_weight = (len(y) - y.sum()) / y.sum()
    model.logit_offset.fill_(-math.log(pos_weight))
    return export_torchscript(model.for_serving()), reference_stats(x, FRAUD_FEATURES)


def test_publish_gates_against_the_serving_version_and_never_serves_a_rejected_one(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    x, y = make_fraud(6000, seed=5)
    holdout = make_fraud(3000, seed=6)
    kwargs = dict(holdout=holdout, x_train=x, training_data={"rows": 6000}, params={},
                  training={"nan": float("nan")}, log=lambda line: None)
    good, reference = _candidate(x, y, epochs=4)
    v1, meta1 = publish_candidate(repo, "fraud", good, reference=reference, **kwargs)
    assert (v1, meta1["gate"], meta1["parent_version"]) == (1, "accepted", None)
    assert meta1["gate_holdout"] == "example" and "0 labelled rows" in meta1["gate_holdout_reason"]
    assert meta1["training"]["nan"] is None  # strict JSON
    untrained, reference0 = _candidate(x[:300], y[:300], epochs=0)
    v2, meta2 = publish_candidate(repo, "fraud", untrained, reference=reference0, **kwargs)
    assert (v2, meta2["gate"], meta2["serving_version"]) == (2, "rejected", 1)
    assert meta2["serving_metrics"]["roc_auc"] == pytest.approx(meta1["metrics"]["roc_auc"])
    assert repo.served_versions("fraud") == [1]
    v3, meta3 = publish_candidate(repo, "fraud", good, reference=reference, **kwargs)
    assert (v3, meta3["gate"], meta3["parent_version"]) == (3, "accepted", 1)
    assert repo.served_versions("fraud") == [3]
