"""Logged traffic joined with its labels (training.traffic): the rows a retrain learns from, and what it reports.

The log files are written by the serving side's own prediction-log writer (`_traffic_helpers`).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _traffic_helpers import T0, log_digits, log_fraud, write_labels
from training.data import fraud_traffic
from training.datasets import FRAUD_FEATURES, load_digits, make_fraud
from training.digits import normalize_digits
from training.digits_data import digits_rows, digits_traffic
from training.traffic import summarize


def _by_id(joined) -> dict[str, int]:
    return {r: i for i, r in enumerate(joined.table.column("request_id").to_pylist())}


def test_predictions_join_their_latest_label_and_the_report_names_every_file(tmp_path):
    x, y = make_fraud(300, seed=1)
    first = log_fraud(tmp_path, "fraud_loop", x[:200], version=1, prefix="a")
    second = log_fraud(tmp_path, "fraud_loop", x[200:], version=2, at=T0 + timedelta(days=2), prefix="b")
    labels_a = write_labels(tmp_path, "fraud_loop", first[:150] + second, np.concatenate([y[:150], y[200:]]))
    # Five rows labelled again, later: the later label wins; one label for a request never logged.
    flipped = write_labels(tmp_path, "fraud_loop", first[:5] + ["never-logged"], np.r_[1 - y[:5], 1],
                           at=T0 + timedelta(days=1), name="labels-0002")
    joined, xt, yt = fraud_traffic(tmp_path, "fraud_loop")

    report = joined.report
    assert report["joined_rows"] == 250 and len(yt) == 250 and xt.shape == (250, 30)
    ids = _by_id(joined)
    np.testing.assert_array_equal(xt[[ids[r] for r in first[:150]]], x[:150])  # each label meets its own row
    np.testing.assert_array_equal(yt[[ids[r] for r in first[:5]]], 1 - y[:5])
    np.testing.assert_array_equal(yt[[ids[r] for r in first[5:150]]], y[5:150])
    assert report["unlabelled_predictions"] == 50 and report["labels_without_prediction"] == 1
    assert report["relabelled"] == 5 and report["outside_window"] == 0
    assert report["label_files"] == [str(labels_a), str(flipped)] and len(report["traffic_files"]) == 2
    assert all("version=1" in f or "version=2" in f for f in report["traffic_files"])
    assert report["by_version"]["1"]["rows"] == 150 and report["by_version"]["2"]["rows"] == 100
    assert report["by_version"]["2"]["first_date"] == report["by_version"]["2"]["last_date"] == "2026-03-04"
    assert report["first_prediction"].startswith("2026-03-02T09:00") and report["skipped_files"] == []
    assert "joined 250 labelled row(s)" in summarize(report)[0]


def test_same_time_labels_tie_to_the_later_file_and_old_labels_fall_outside_the_window(tmp_path):
    x, y = make_fraud(40, seed=2)
    ids = log_fraud(tmp_path, "fraud", x)
    write_labels(tmp_path, "fraud", ids[:10], np.zeros(10), name="a")
    write_labels(tmp_path, "fraud", ids[:10], np.ones(10), name="b")  # same received_at: file b is later
    write_labels(tmp_path, "fraud", ids[10:], y[10:], at=T0 + timedelta(days=20), name="c")  # 20 days on
    joined, _, yt = fraud_traffic(tmp_path, "fraud", window_days=14)
    assert joined.report["joined_rows"] == 10 and (yt == 1).all()
    assert joined.report["outside_window"] == 30
    assert fraud_traffic(tmp_path, "fraud", window_days=30)[0].report["joined_rows"] == 40


def test_no_traffic_and_traffic_without_labels_train_on_the_example_data_and_say_so(tmp_path):
    joined, x, y = fraud_traffic(tmp_path, "fraud")
    assert len(y) == 0 and x.shape == (0, 30) and joined.report["predictions_logged"] == 0
    assert "nothing logged under" in summarize(joined.report)[0]
    log_fraud(tmp_path, "fraud", make_fraud(20, seed=3)[0])
    joined, _, y = fraud_traffic(tmp_path, "fraud")
    assert len(y) == 0 and joined.report["unlabelled_predictions"] == 20
    assert "20 prediction(s) of fraud logged, but no labels" in summarize(joined.report)[0]
    assert "POST /v2/models/fraud/feedback" in summarize(joined.report)[0]


def test_files_a_model_cannot_train_on_are_skipped_with_the_reason(tmp_path):
    x, y = make_fraud(60, seed=4)
    good = log_fraud(tmp_path, "fraud", x[:20], prefix="ok")
    hashed = log_fraud(tmp_path, "fraud", x[20:40], prefix="hashed", redact="amount=hash")
    dropped = log_fraud(tmp_path, "fraud", x[40:], prefix="dropped", redact="hour=drop,merchant_risk=drop")
    write_labels(tmp_path, "fraud", good + hashed + dropped, y)
    folder = tmp_path / "traffic" / "fraud" / "version=1" / "date=2026-03-02"
    (folder / "broken.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"amount": [1.0]}), folder / "old-style.parquet")  # the columns of the example data
    odd = {"request_id": ["z"], "row": ["first"], "timestamp": pa.array([0], pa.timestamp("us", tz="UTC")),
           **{name: pa.array([0.5], pa.float32()) for name in FRAUD_FEATURES}}
    pq.write_table(pa.table(odd), folder / "odd-rows.parquet")  # its footer passes; its rows do not cast
    bad_labels = tmp_path / "labels" / "fraud" / "date=2026-03-02" / "labels-text.parquet"
    pq.write_table(pa.table({"request_id": good[:2], "row": [0, 0], "label": ["yes", "no"],
                             "received_at": pa.array([0, 0], pa.timestamp("us", tz="UTC"))}), bad_labels)

    joined, xt, _ = fraud_traffic(tmp_path, "fraud")
    assert joined.report["joined_rows"] == 20 and len(xt) == 20  # only the full rows train
    reasons = {s["path"].rsplit("/", 1)[-1].split("-test-")[-1]: s["reason"] for s in joined.report["skipped_files"]}
    assert len(reasons) == 6
    assert reasons["odd-rows.parquet"].startswith("unreadable rows")
    assert "amount redacted (logged as uint64 hashes)" in reasons["hashed-0-000001.parquet"]
    assert "hour, merchant_risk missing" in reasons["dropped-0-000001.parquet"]
    assert reasons["broken.parquet"].startswith("unreadable parquet")
    assert "not a prediction log file: lacks ['request_id', 'row', 'timestamp']" in reasons["old-style.parquet"]
    assert "column 'label' is string, not an integer class" in reasons["labels-text.parquet"]
    lines = summarize(joined.report)
    assert sum(line.startswith("  skipped ") for line in lines) == 5 and "1 more skipped file" in lines[-1]


def test_labels_outside_the_classes_are_counted_not_trained_on(tmp_path):
    x, _ = make_fraud(10, seed=5)
    ids = log_fraud(tmp_path, "fraud", x)
    write_labels(tmp_path, "fraud", ids, [0, 1, 2, -1, 0, 1, 0, 0, 7, 1])
    joined, _, y = fraud_traffic(tmp_path, "fraud")
    assert joined.report["invalid_labels"] == 3 and sorted(set(y.tolist())) == [0, 1] and len(y) == 7


def test_digits_traffic_images_of_any_size_become_what_the_server_feeds_the_model(tmp_path):
    data = load_digits(seed=0)
    images = [np.kron(im, np.ones((k, k), np.uint8)) for im, k in zip(data.x_holdout[:90], [1, 2, 3] * 30)]
    images[0] = np.asarray(np.arange(13 * 7).reshape(13, 7) % 255, np.uint8)  # not square, not a multiple
    ids = log_digits(tmp_path, "digits", images, prefix="full")
    hashed = log_digits(tmp_path, "digits", images[:10], prefix="hash", full=False)
    write_labels(tmp_path, "digits", ids + hashed, np.r_[data.y_holdout[:90], data.y_holdout[:10]])

    joined, x, y = digits_traffic(tmp_path, "digits")
    assert x.shape == (90, 1, 8, 8) and joined.report["image_sizes"] == {"13x7": 1, "8x8": 29, "16x16": 30,
                                                                          "24x24": 30}
    ids_at = _by_id(joined)
    for k in (0, 1, 2, 89):
        np.testing.assert_allclose(x[ids_at[ids[k]]], normalize_digits(images[k][None])[0], atol=1e-6)
        assert y[ids_at[ids[k]]] == data.y_holdout[k]
    (skipped,) = joined.report["skipped_files"]
    assert "fleet.log.inputs: full" in skipped["reason"] and skipped["rows"] == 10

    rows = digits_rows(tmp_path, "digits")  # with the example digits, written on first use
    assert (tmp_path / "digits" / "digits-seed0.parquet").exists()
    assert len(rows.holdout.y) + len(rows.validation.y) + len(rows.train.y) == 1797 + 90
    assert int(rows.holdout.traffic.sum()) + int(rows.validation.traffic.sum()) + int(rows.train.traffic.sum()) == 90
    assert int((~rows.holdout.traffic).sum()) == 359  # the example's own holdout: the bootstrap never trained on it
    assert rows.sources.describe()["traffic_files"] == 1 and rows.sources.describe()["label_files"] == 1
