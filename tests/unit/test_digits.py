"""The digits example: scikit-learn's digits as uint8 images, DigitsCNN, bootstrap_digits into a repository.

The published model is fed what `preprocess: image` makes of the client's
images (`training.digits.normalize_digits`), as the server will.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from _traffic_helpers import log_digits, write_labels
from serving.model_config import spec_from_config
from serving.registry import ModelRepository
from training.artifacts import export_torchscript, load_torchscript
from training.data import source_weights
from training.datasets import load_digits
from training.digits import DigitsParams, bootstrap_digits, digits_config, evaluate_digits, normalize_digits
from training.digits_data import digits_rows
from training.digits_job import DigitsPrepared, publish_digits
from training.digits_loop import weighted_cross_entropy
from training.models import DigitsCNN
from training.preprocess_reference import image_batch
from training.train_loop import row_weights


def test_digits_loader_gives_uint8_images_and_a_seeded_split():
    data = load_digits(seed=4)
    assert data.x_train.shape[1:] == (8, 8) and data.x_train.dtype == np.uint8
    assert data.x_holdout.shape[1:] == (8, 8) and data.x_holdout.dtype == np.uint8
    assert data.y_train.dtype == np.int64 and data.y_holdout.dtype == np.int64
    assert len(data.x_train) == len(data.y_train) and len(data.x_holdout) == len(data.y_holdout)
    assert len(data.y_train) + len(data.y_holdout) == 1797 and len(data.y_holdout) == 359  # 20 %
    images = np.concatenate([data.x_train, data.x_holdout])
    assert images.min() == 0 and images.max() == 255  # 0..16 scaled to the full uint8 range
    assert set(np.unique(data.y_holdout)) == set(range(10))
    again, other = load_digits(seed=4), load_digits(seed=5)
    assert np.array_equal(again.x_holdout, data.x_holdout) and np.array_equal(again.y_train, data.y_train)
    assert not np.array_equal(other.y_holdout, data.y_holdout)


def test_normalisation_matches_the_configured_preprocessing():
    images = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)
    out = image_batch(images, (2, 2), 0.5, 0.5)
    assert out.dtype == np.float32 and out.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(out[0, 0], (images[0] / 255.0 - 0.5) / 0.5, atol=1e-6)  # same size: no resampling
    assert normalize_digits(np.zeros((3, 28, 20), np.uint8)).shape == (3, 1, 8, 8)  # any size comes out 8 x 8


def test_scripted_cnn_returns_probabilities_per_image():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    scripted = load_torchscript(export_torchscript(model))
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        p = scripted(x)
        eager = model(x)
    assert p.shape == (5, 10) and p.dtype == torch.float32
    assert torch.allclose(p.sum(dim=1), torch.ones(5), atol=1e-6)
    assert ((p >= 0) & (p <= 1)).all()
    assert torch.allclose(p, eager, atol=1e-6)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-repo")
    lines: list[str] = []
    assert bootstrap_digits(str(root), seed=0, num_threads=2, log=lines.append) == 1
    return ModelRepository(str(root)), lines


def test_bootstrap_digits_publishes_an_accurate_version(published):
    repo, lines = published
    assert repo.list_models() == ["digits"] and repo.list_versions("digits") == [1]
    meta = repo.metadata("digits", 1)
    assert meta["metrics"]["accuracy"] > 0.9 and meta["metrics"]["holdout_rows"] == 359
    assert re.match(r"^\d{4}-\d{2}-\d{2}T", meta["created_at"]) and meta["framework"] == f"torch {torch.__version__}"
    assert meta["training_data"]["source"] == "sklearn.datasets.load_digits"
    assert meta["params"]["epochs"] == DigitsParams().epochs and meta["class_names"] == [str(c) for c in range(10)]
    assert meta["parent_version"] is None and "git_sha" in meta
    assert any("published digits version 1" in line for line in lines)

    # The file on disk, fed what the server makes of the holdout images, scores as recorded.
    data = load_digits(seed=0)
    model = torch.jit.load(repo.model_file("digits", 1))
    again = evaluate_digits(model, normalize_digits(data.x_holdout), data.y_holdout)
    assert again["accuracy"] == pytest.approx(meta["metrics"]["accuracy"])


def test_bootstrap_digits_config_is_accepted_with_image_preprocessing(published):
    repo, _ = published
    spec = repo.spec("digits")
    assert spec == spec_from_config(digits_config())
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [("image", "UINT8", (-1, -1))]
    assert [(t.name, t.datatype, t.dims) for t in spec.outputs] == [("probabilities", "FP32", (10,))]
    assert spec.max_batch_size == 64 and spec.batching.max_queue_delay_us == 1000
    assert spec.batching.queue.max_queue_size == 4096
    assert dict(spec.parameters) == {
        "preprocess": "image", "preprocess.size": "8,8", "preprocess.mean": "0.5", "preprocess.std": "0.5",
    }  # fmt: skip


def test_bootstrap_digits_records_its_monitoring_reference(published):
    repo, _ = published
    meta = repo.metadata("digits", 1)
    ref = meta["monitoring"]
    assert "pca" not in ref  # no tabular input
    assert ref["scores"]["output"] == "probabilities" and ref["scores"]["rows"] == 359
    assert sum(ref["scores"]["counts"]) == 359 and ref["label_error"]["rows"] == 359
    # The score of an image is its top class probability; the baseline error is the holdout's.
    assert 0.1 <= ref["scores"]["edges"][0] < ref["scores"]["edges"][-1] <= 1.0 + 1e-6
    assert ref["label_error"]["rate"] == pytest.approx(1.0 - meta["metrics"]["accuracy"])


def _train_on_rows(rows, weights, epochs: int = 12) -> DigitsCNN:
    """What the Ray loop does per worker (training.digits_loop), in-process: weighted cross-entropy on the rows."""
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = torch.from_numpy(rows.train.x), torch.from_numpy(rows.train.y)
    w = row_weights(torch.from_numpy(rows.train.traffic.astype(np.float32)), weights)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad(set_to_none=True)
            weighted_cross_entropy(model.logits(x[idx]), y[idx], w[idx]).backward()
            optimizer.step()
    return model.eval()


def test_digits_retrained_on_traffic_of_another_kind_wins_on_the_traffic_holdout(published, tmp_path):
    """Clients start sending inverted digits (white background), 16 x 16: labelled, they retrain the model."""
    source, _ = published
    shutil.copytree(source.root_uri, tmp_path / "repo")
    repo = ModelRepository(str(tmp_path / "repo"))
    torch.set_num_threads(1)
    data = load_digits(seed=5)
    images = [np.kron(255 - im, np.ones((2, 2), np.uint8)) for im in data.x_train[:700]]
    ids = log_digits(tmp_path / "data", "digits", images)
    write_labels(tmp_path / "data", "digits", ids, data.y_train[:700])
    rows = digits_rows(tmp_path / "data", "digits")
    weights = source_weights(int((~rows.train.traffic).sum()), int(rows.train.traffic.sum()))
    prepared = DigitsPrepared(rows, {}, weights)
    model_file = export_torchscript(_train_on_rows(rows, weights))
    version, meta = publish_digits(repo, "digits", model_file, prepared, params={}, training={}, tolerance=0.002,
                                   min_traffic_holdout=100, log=lambda line: None)

    assert version == 2 and meta["gate"] == "accepted" and meta["gate_holdout"] == "traffic"
    recent, old = meta["holdouts"]["traffic"], meta["holdouts"]["example"]
    assert recent["rows"] == int(rows.holdout.traffic.sum()) >= 100 and old["rows"] == 359
    assert recent["serving"]["accuracy"] < 0.5 < 0.85 < recent["candidate"]["accuracy"]
    assert old["candidate"]["accuracy"] > 0.85 and old["serving"]["accuracy"] > 0.9
    assert meta["gate_reason"].startswith("traffic holdout accuracy")
    assert meta["training_data"]["traffic"]["joined_rows"] == 700 and meta["training_data"]["traffic_files"] == 1
    assert meta["training_data"]["traffic"]["image_sizes"] == {"16x16": 700}
    ref = meta["monitoring"]
    assert "pca" not in ref and ref["scores"]["rows"] == len(rows.holdout.y) == sum(ref["scores"]["counts"])
    expected_error = 1 - (recent["candidate"]["accuracy"] * recent["rows"] + old["candidate"]["accuracy"] * 359) / \
        (recent["rows"] + 359)
    assert ref["label_error"]["rate"] == pytest.approx(expected_error)
    assert repo.served_versions("digits") == [2]
