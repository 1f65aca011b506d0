"""The gate after a drift: recent labelled traffic weighs in training and decides on its own holdout.

The example data follows the old concept; the logged traffic (written by the serving side's
prediction-log writer, labelled through the feedback layout) follows `concept_shift`. These
tests run the job's own pieces without Ray: the join (training.data.fraud_traffic), the hash
split, the row weights (source_weights, the weighted loss the Ray loop uses too), publish_candidate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _traffic_helpers import log_fraud, write_labels
from serving.registry import ModelRepository
from training.artifacts import export_torchscript
from training.bootstrap import FRAUD_CLIP, FRAUD_FEATURES, TrainParams, evaluate, fit_fraud, reference_stats
from training.data import HOLDOUT_PERCENT, VALIDATION_PERCENT, fraud_traffic, source_weights, split_buckets
from training.datasets import make_fraud
from training.preprocess_reference import standardize
from training.publish import MIN_CLASS_ROWS, gate, pick_holdout, publish_candidate, read_bytes

_QUIET = {"log": lambda line: None}


def _publish(repo, x, y, holdout, traffic_holdout=None, weights=None, **extra):
    model = fit_fraud(x, y, TrainParams(epochs=4), seed=0, weights=weights)
    return publish_candidate(repo, "fraud_loop", export_torchscript(model.for_serving()), holdout=holdout,
                             traffic_holdout=traffic_holdout, reference=reference_stats(x, FRAUD_FEATURES),
                             x_train=x, training_data={}, params={}, training={}, **_QUIET, **extra)


@pytest.fixture(scope="module")
def after_the_shift(tmp_path_factory):
    """A serving version of the old concept, then a candidate trained on old example data plus shifted traffic."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("data")
    repo = ModelRepository(str(tmp_path_factory.mktemp("repo")))
    x_old, y_old = make_fraud(12_000, seed=1)
    _publish(repo, x_old, y_old, make_fraud(3_000, seed=9))  # version 1: what serves when the concept moves
    x_traffic, y_traffic = make_fraud(15_000, seed=7, scenario="concept_shift")
    ids = log_fraud(root, "fraud_loop", x_traffic)
    write_labels(root, "fraud_loop", ids, y_traffic)
    joined, tx, ty = fraud_traffic(root, "fraud_loop")
    ex, ey = make_fraud(12_000, seed=2)  # the example data: still the old concept
    x, y = np.concatenate([ex, tx]), np.concatenate([ey, ty])
    from_traffic = np.r_[np.zeros(len(ey), bool), np.ones(len(ty), bool)]
    bucket = split_buckets(x)
    holdout, train = bucket < HOLDOUT_PERCENT, bucket >= HOLDOUT_PERCENT + VALIDATION_PERCENT
    weights = source_weights(int((train & ~from_traffic).sum()), int((train & from_traffic).sum()))
    w = np.where(from_traffic, weights[1], weights[0])[train]
    example_holdout = (x[holdout & ~from_traffic], y[holdout & ~from_traffic])
    traffic_holdout = (x[holdout & from_traffic], y[holdout & from_traffic])
    version, meta = _publish(repo, x[train], y[train], example_holdout, traffic_holdout, weights=w)
    return repo, version, meta, (x[train], example_holdout, traffic_holdout, joined.report)


def test_the_candidate_wins_on_recent_traffic_and_is_accepted_though_the_old_holdout_would_reject_it(after_the_shift):
    repo, version, meta, (_, _, traffic_holdout, report) = after_the_shift
    assert report["joined_rows"] == 15_000
    assert meta["gate"] == "accepted" and meta["gate_holdout"] == "traffic" and version == 2
    assert meta["gate_reason"].startswith("traffic holdout ROC AUC")
    old, recent = meta["holdouts"]["example"], meta["holdouts"]["traffic"]
    assert recent["rows"] == len(traffic_holdout[1]) and recent["positives"] >= MIN_CLASS_ROWS
    # On recent traffic the serving version is no better than chance; the candidate has learnt the new concept.
    assert recent["serving"]["roc_auc"] < 0.6 and recent["candidate"]["roc_auc"] > 0.9
    # On the old holdout the serving version wins by far: judged there, this candidate would be rejected.
    assert old["candidate"]["roc_auc"] < old["serving"]["roc_auc"] - 0.05
    assert gate(old["candidate"], old["serving"])[0] == "rejected"
    assert meta["metrics"]["roc_auc"] == recent["candidate"]["roc_auc"] and meta["metrics"]["holdout"] == "traffic"
    assert repo.served_versions("fraud_loop") == [2]


def test_without_enough_recent_rows_the_old_holdout_decides(after_the_shift):
    repo, _, _, (x_train, example_holdout, traffic_holdout, _) = after_the_shift
    model_file = read_bytes(repo.model_file("fraud_loop", 2))  # version 2 again, the traffic holdout's bar raised
    version, meta = publish_candidate(repo, "fraud_loop", model_file, holdout=example_holdout,
                                      traffic_holdout=traffic_holdout, min_traffic_holdout=10 * len(traffic_holdout[1]),
                                      reference=repo.metadata("fraud_loop", 2)["reference_stats"], x_train=x_train,
                                      training_data={}, params={}, training={}, **_QUIET)
    assert meta["gate_holdout"] == "example" and "fewer than" in meta["gate_holdout_reason"]
    # Version 2 serves now, and the same file scores the same: within the tolerance, accepted.
    assert meta["gate"] == "accepted" and meta["serving_version"] == 2
    assert meta["holdouts"]["traffic"]["candidate"] == pytest.approx(meta["holdouts"]["traffic"]["serving"])


def test_the_monitoring_reference_describes_the_published_file_on_the_holdouts(after_the_shift):
    repo, version, meta, (x_train, example_holdout, traffic_holdout, _) = after_the_shift
    ref = meta["monitoring"]
    rows = len(example_holdout[1]) + len(traffic_holdout[1])
    assert ref["scores"]["output"] == "probability" and ref["scores"]["rows"] == rows
    assert sum(ref["scores"]["counts"]) == rows and len(ref["scores"]["edges"]) == len(ref["scores"]["counts"]) + 1
    assert np.all(np.diff(ref["scores"]["edges"]) > 0)
    # The baseline label error is the published file's on those rows, standardized as the server does.
    x = np.concatenate([example_holdout[0], traffic_holdout[0]])
    y = np.concatenate([example_holdout[1], traffic_holdout[1]])
    z = standardize(x, repo.metadata("fraud_loop", version), FRAUD_CLIP)
    with torch.inference_mode():
        p = torch.jit.load(repo.model_file("fraud_loop", version))(torch.from_numpy(z)).numpy()[:, 0]
    assert ref["label_error"]["rows"] == rows
    assert ref["label_error"]["rate"] == pytest.approx(float(np.mean((p >= 0.5) != (y == 1))))
    pca = ref["pca"]
    components = np.asarray(pca["components"], np.float64)
    assert components.shape[1] == 30 and 1 <= components.shape[0] < 30 and pca["explained"] >= pca["variance"]
    np.testing.assert_allclose(components @ components.T, np.eye(len(components)), atol=1e-4)  # orthonormal
    assert sum(pca["counts"]) == pca["rows"] == rows
    z_train = standardize(x_train, repo.metadata("fraud_loop", version), FRAUD_CLIP)
    np.testing.assert_allclose(pca["mean"], z_train.mean(axis=0), atol=1e-4)  # fitted on the training rows


def test_traffic_weight_makes_a_small_recent_sample_count():
    torch.set_num_threads(1)
    ex, ey = make_fraud(16_000, seed=2)
    tx, ty = make_fraud(2_000, seed=7, scenario="concept_shift")  # a little labelled traffic after the shift
    x, y = np.concatenate([ex, tx]), np.concatenate([ey, ty])
    from_traffic = np.r_[np.zeros(len(ey), bool), np.ones(len(ty), bool)]
    recent = make_fraud(20_000, seed=11, scenario="concept_shift")
    auc = {}
    for share in (0.0, 0.5):
        w_example, w_traffic = source_weights(len(ey), len(ty), share)
        model = fit_fraud(x, y, TrainParams(epochs=4), seed=0, weights=np.where(from_traffic, w_traffic, w_example))
        auc[share] = evaluate(model, *recent)["roc_auc"]
    assert auc[0.5] > auc[0.0] + 0.03, auc  # measured: 0.874 vs 0.799


def test_the_traffic_holdout_decides_only_with_enough_rows_of_each_class():
    assert pick_holdout(None)[0] == "example"
    assert pick_holdout(np.r_[np.zeros(400), np.ones(50)], 500) == (
        "example", "the traffic holdout has 450 labelled rows, fewer than 500")
    verdict, why = pick_holdout(np.r_[np.zeros(990), np.ones(MIN_CLASS_ROWS - 1)], 500)
    assert verdict == "example" and f"fewer than {MIN_CLASS_ROWS} of a class" in why
    assert pick_holdout(np.r_[np.zeros(990), np.ones(MIN_CLASS_ROWS)], 500)[0] == "traffic"
    assert pick_holdout(np.full(600, 3), 500, binary=False)[0] == "traffic"  # digits: rows are enough
    assert gate({"accuracy": 0.95}, {"accuracy": 0.96}, 0.002, metric="accuracy", holdout="traffic holdout") == (
        "rejected", "traffic holdout accuracy 0.9500 vs 0.9600 serving (tolerance 0.002)")
