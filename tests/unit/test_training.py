"""The fraud example: seeded generator, FraudMLP (eager == TorchScript), bootstrap into a repository.

The published model takes z-scores: the server standardizes (`preprocess:
standardize`), and these tests feed it through `preprocess_reference.standardize`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from serving.model_config import spec_from_config
from serving.registry import ModelRepository
from training import bootstrap as boot
from training.artifacts import load_torchscript
from training.datasets import FRAUD_FEATURES, main as datasets_main, make_fraud
from training.models import FraudMLP
from training.preprocess_reference import feature_stats, standardize

# Small enough to keep the whole file in a few seconds, big enough for a stable AUC.
_ROWS, _EPOCHS = 16_000, 4


def test_generator_is_deterministic_with_about_one_percent_fraud():
    x1, y1 = make_fraud(20_000, seed=3)
    x2, y2 = make_fraud(20_000, seed=3)
    assert x1.shape == (20_000, 30) and x1.dtype == np.float32
    assert y1.shape == (20_000,) and y1.dtype == np.int64
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert 0.006 < y1.mean() < 0.014
    x3, _ = make_fraud(20_000, seed=4)
    assert not np.array_equal(x1, x3)
    assert len(FRAUD_FEATURES) == 30 and len(set(FRAUD_FEATURES)) == 30
    assert np.isfinite(x1).all()


def test_covariate_shift_moves_features_and_concept_shift_moves_labels():
    xb, yb = make_fraud(20_000, seed=5)
    xc, yc = make_fraud(20_000, seed=5, scenario="covariate_shift")
    xk, yk = make_fraud(20_000, seed=5, scenario="concept_shift")
    # Several features move by a large fraction of their baseline spread.
    moved = np.abs(xc.mean(0) - xb.mean(0)) / xb.std(0)
    assert (moved > 0.3).sum() >= 5
    # Concept shift: the same features, a different rule with the same ~1% fraud.
    assert np.array_equal(xk, xb)
    assert 0.006 < yk.mean() < 0.014
    assert (yk & yb).sum() < 0.3 * min(yk.sum(), yb.sum())  # mostly different transactions are fraud


def test_unknown_scenario_is_a_clear_error():
    with pytest.raises(ValueError, match="covariate_shift"):
        make_fraud(10, scenario="nope")


def test_datasets_cli_writes_parquet(tmp_path, capsys):
    assert datasets_main(["fraud", "--rows", "500", "--seed", "2", "--scenario", "covariate_shift", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.parquet")
    table = pq.read_table(path)
    assert table.column_names == FRAUD_FEATURES + ["label"]
    x, y = make_fraud(500, seed=2, scenario="covariate_shift")
    assert np.array_equal(table.column("amount").to_numpy(), x[:, 0])
    assert np.array_equal(table.column("label").to_numpy(), y)
    assert str(path) in capsys.readouterr().out


def test_scripted_model_equals_eager():
    torch.manual_seed(0)
    x = torch.randn(257, 30) * 5 + 2
    model = FraudMLP(x.mean(0), x.std(0), hidden=16, depth=3, dropout=0.2).eval()
    model.logit_offset.fill_(-2.0)
    scripted = torch.jit.script(model)
    eager = model(x)
    assert eager.shape == (257, 1)
    assert torch.equal(scripted(x), eager)
    assert ((eager >= 0) & (eager <= 1)).all()


def _served_metadata(x: np.ndarray) -> dict:
    """The part of metadata.json the server standardizes with."""
    return {"feature_names": list(FRAUD_FEATURES), "reference_stats": boot.reference_stats(x, FRAUD_FEATURES)}


def test_exported_model_on_standardized_rows_equals_eager_on_raw_rows():
    # Training clips the z-scores as the server does, so the two agree on outliers too.
    x, y = make_fraud(4_000, seed=2)
    x[:, 7] = 1.0  # a constant feature: the std guard must match on both sides
    mean, std = feature_stats(x)
    model = FraudMLP(mean, std, hidden=16, depth=2).eval()
    model.logit_offset.fill_(-3.0)
    exported = load_torchscript(boot.export_torchscript(model.for_serving()))
    with torch.inference_mode():
        eager = model(torch.from_numpy(x))
        served = exported(torch.from_numpy(standardize(x, _served_metadata(x), boot.FRAUD_CLIP)))
    assert served.shape == (4_000, 1)
    assert float((served - eager).abs().max()) < 1e-5
    assert model.prestandardized is False  # exporting leaves the eager model on raw features


def test_standardize_clips_z_scores_as_the_config_says():
    x, _ = make_fraud(4_000, seed=2)
    z = standardize(x, _served_metadata(x), boot.FRAUD_CLIP)
    assert z.dtype == np.float32 and z.shape == x.shape
    assert np.abs(z).max() == pytest.approx(boot.FRAUD_CLIP)
    assert abs(float(z[:, 0].mean())) < 0.05  # amount: roughly centred (clipping trims its long tail)


def test_fraud_config_declares_server_side_standardization():
    spec = spec_from_config(boot.fraud_config())
    assert spec.parameters["preprocess"] == "standardize"
    assert float(spec.parameters["preprocess.clip"]) == boot.FRAUD_CLIP == 10.0
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [("features", "FP32", (30,))]


def test_constant_feature_does_not_blow_up():
    x = np.random.default_rng(0).normal(size=(100, 30)).astype(np.float32)
    x[:, 7] = 1.0
    model = FraudMLP(x.mean(0), x.std(0)).eval()
    assert torch.isfinite(model(torch.from_numpy(x))).all()


def test_reference_stats_cover_the_training_data():
    x, _ = make_fraud(5_000, seed=1)
    stats = boot.reference_stats(x, FRAUD_FEATURES)
    assert list(stats) == FRAUD_FEATURES
    for s in stats.values():
        assert len(s["edges"]) == 21 and len(s["counts"]) == 20
        assert np.all(np.diff(s["edges"]) > 0)
        assert sum(s["counts"]) == 5_000
    assert stats["amount"]["mean"] == pytest.approx(float(x[:, 0].astype(np.float64).mean()))
    # Exactly the statistics the model is trained with (FraudMLP's buffers), so the server standardizes alike.
    model = FraudMLP(*feature_stats(x))
    assert [stats[n]["mean"] for n in FRAUD_FEATURES] == model.mean.tolist()
    assert [stats[n]["std"] for n in FRAUD_FEATURES] == model.std.tolist()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    code = boot.main(["--repository", str(root), "--rows", str(_ROWS), "--epochs", str(_EPOCHS), "--seed", "1",
                      "--trainer", "plain"])  # no Ray in unit tests: the Ray path is e2e (tests/e2e/test_cli.py)
    assert code == 0
    return ModelRepository(str(root))


def test_bootstrap_publishes_a_loadable_fraud_model(published):
    repo = published
    assert repo.list_models() == ["digits", "fraud"]  # the CLI publishes both examples
    assert repo.list_versions("fraud") == [1]
    spec = repo.spec("fraud")
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [("features", "FP32", (30,))]
    assert [(t.name, t.datatype, t.dims) for t in spec.outputs] == [("probability", "FP32", (1,))]
    assert spec.max_batch_size == 256 and spec.batching.max_queue_delay_us == 1000
    assert spec.batching.queue.max_queue_size == 4096 and spec.instance_count == 1
    assert spec.parameters["preprocess"] == "standardize"

    model = torch.jit.load(repo.model_file("fraud", 1))
    x, y = make_fraud(20_000, seed=12_345)  # rows the model never saw
    z = standardize(x, repo.metadata("fraud", 1), float(spec.parameters["preprocess.clip"]))  # as the server does
    with torch.inference_mode():
        p = model(torch.from_numpy(z))
    assert p.shape == (20_000, 1) and p.dtype == torch.float32
    assert ((p >= 0) & (p <= 1)).all()
    assert roc_auc_score(y, p.numpy()[:, 0]) > 0.85
    # The served probability is calibrated (pos_weight undone), not inflated ~100x.
    assert 0.3 * y.mean() < float(p.mean()) < 3 * y.mean()


def test_bootstrap_metadata(published):
    meta = published.metadata("fraud", 1)
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(\+00:00|Z)$", meta["created_at"])
    assert meta["framework"] == f"torch {torch.__version__}"
    data = meta["training_data"]
    assert data["generator"] == "training.datasets.make_fraud"
    assert data["seed"] == 1 and data["rows"] == _ROWS
    x, y = make_fraud(_ROWS, seed=1)
    n = data["train_rows"]
    assert data["sha256"] == boot.arrays_sha256(x[:n], y[:n])
    assert meta["params"]["epochs"] == _EPOCHS and meta["params"]["hidden"] > 0
    metrics = meta["metrics"]
    assert all(isinstance(metrics[k], float) for k in ("loss", "accuracy", "roc_auc"))
    assert metrics["roc_auc"] > 0.85 and 0.9 < metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert 0 <= metrics["holdout_clipped_rows"] < 0.01 * metrics["holdout_rows"]
    # The recorded metrics are the published file's on holdout rows as the server standardizes them.
    served = boot.evaluate(torch.jit.load(published.model_file("fraud", 1)), standardize(x[n:], meta, boot.FRAUD_CLIP),
                           y[n:])
    assert served == {k: pytest.approx(metrics[k]) for k in ("loss", "accuracy", "roc_auc")}
    assert meta["parent_version"] is None
    assert "git_sha" in meta and (meta["git_sha"] is None or re.match(r"^[0-9a-f]{40}$", meta["git_sha"]))
    assert meta["feature_names"] == FRAUD_FEATURES
    ref = meta["reference_stats"]  # the registry writes JSON with sorted keys: feature_names holds the order
    assert sorted(ref) == sorted(FRAUD_FEATURES)
    assert all(len(s["edges"]) == 21 and sum(s["counts"]) == n for s in ref.values())
    monitoring = meta["monitoring"]  # what live traffic is compared with: the holdout as the file answers it
    assert monitoring["scores"]["rows"] == sum(monitoring["scores"]["counts"]) == metrics["holdout_rows"]
    assert monitoring["label_error"]["rows"] == metrics["holdout_rows"]
    assert monitoring["label_error"]["rate"] == pytest.approx(1.0 - metrics["accuracy"])
    components = np.asarray(monitoring["pca"]["components"])
    np.testing.assert_allclose(components @ components.T, np.eye(len(components)), atol=1e-4)
    assert sum(monitoring["pca"]["counts"]) == metrics["holdout_rows"] and components.shape[1] == 30
    json.dumps(meta, allow_nan=False)  # strict JSON: no NaN slipped in


def test_if_empty_publishes_nothing_new(published, capsys):
    assert boot.main(["--repository", published.root_uri, "--if-empty", "--rows", "200", "--epochs", "1"]) == 0
    assert "already holds models" in capsys.readouterr().out
    assert published.list_versions("fraud") == [1]


def test_if_empty_on_an_empty_repository_trains(tmp_path):
    version = boot.bootstrap(str(tmp_path / "repo"), rows=2_000, epochs=1, if_empty=True, log=lambda _: None)
    assert version == 1
