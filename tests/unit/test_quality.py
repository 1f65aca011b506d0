"""Online quality: the metrics equal sklearn's on the same rows; rows and time windows; bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from serving.monitoring.quality import QualityWindow, quality_metrics


def test_binary_metrics_equal_sklearns_on_the_same_rows():
    rng = np.random.default_rng(1)
    score = rng.random(5000)
    y = (rng.random(5000) < score * 0.3).astype(np.int64)
    m = quality_metrics("binary", score, y)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean((score >= 0.5) == (y == 1)))
    assert m["label_error_rate"] == pytest.approx(1 - m["accuracy"])
    assert m["brier"] == pytest.approx(np.mean((score - y) ** 2))
    # A calibrated score has a small expected calibration error, a shifted one a large one.
    calibrated = rng.random(20_000)
    truth = (rng.random(20_000) < calibrated).astype(np.int64)
    assert quality_metrics("binary", calibrated, truth)["calibration_error"] < 0.02
    assert quality_metrics("binary", np.clip(calibrated + 0.3, 0, 1), truth)["calibration_error"] > 0.2
    assert quality_metrics("binary", score, np.zeros(5000, np.int64))["roc_auc"] is None  # one class: undefined


def test_multiclass_and_regression():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), 2000)
    y = rng.integers(0, 4, 2000)
    m = quality_metrics("multiclass", probs, y)
    assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    r = quality_metrics("regression", np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    assert r["mae"] == pytest.approx(1.0) and r["rmse"] == pytest.approx(np.sqrt(5 / 3))


def test_the_rows_window_keeps_the_latest_labels_and_the_time_window_the_recent_predictions():
    w = QualityWindow("binary", window_labels=100, window_s=60, max_rows=300)
    now = 1_000_000.0
    old = np.full(200, int((now - 3600) * 1e6))  # an hour ago, all wrong
    w.add(old, np.full(200, 0.9), np.zeros(200, np.int64))
    recent = np.full(100, int((now - 10) * 1e6))  # 10 s ago, all right
    w.add(recent, np.full(100, 0.9), np.ones(100, np.int64))
    report = w.report(now)
    assert report["rows"]["rows"] == 100 and report["rows"]["accuracy"] == 1.0
    assert report["time"]["rows"] == 100 and report["time"]["accuracy"] == 1.0
    assert report["labelled"] == 300
    w.add(recent, np.full(100, 0.1), np.ones(100, np.int64))
    assert w._rows <= 300 + 100  # bounded: the oldest chunk left
    assert w.report(now)["rows"]["accuracy"] == 0.0
