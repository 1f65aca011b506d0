"""The prediction log on a live cluster: every answered row, as sent and as answered, read back as one table.

Two ingress replicas each write their own files (`<data>/traffic/<model>/version=<v>/date=<d>/`);
pyarrow.dataset, Ray Data and DuckDB read the model's folder as one table.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.monitoring.hashing import bytes_hash, row_hashes, value_hashes
from serving.monitoring.logrows import sampled
from integration._monitoring import fraud_rows, infer_rows, read_log, wait_until

pytestmark = pytest.mark.integration


def _by_key(table) -> dict:
    doc = table.to_pydict()
    return {(rid, row): i for i, (rid, row) in enumerate(zip(doc["request_id"], doc["row"]))}


def test_every_answered_row_is_logged_as_sent_and_as_answered_across_two_replicas(fleet_cluster, base_url):
    settings = fleet_cluster[0]
    x, _ = fraud_rows(600, seed=11)
    started = time.time()
    ids = [f"log-{i}" if i % 2 == 0 else None for i in range(200)]  # half without an id: fleet makes one
    single = infer_rows(base_url, "fraud_log", x[:200], ids=ids)
    multi = infer_rows(base_url, "fraud_log", x[200:], rows_per_request=4)
    finished = time.time()
    for answer in multi:  # rows of x, not of x[200:]
        answer["rows"] = (answer["rows"][0] + 200, answer["rows"][1] + 200)
    answers = single + multi
    assert all(a["status"] == 200 for a in answers), [a for a in answers if a["status"] != 200][:3]
    returned = [a["id"] for a in answers]
    assert returned[:200:2] == ids[::2]  # a client's id comes back as it was
    assert all(r for r in returned) and len(set(returned)) == len(returned)  # every request has one, unique

    table = wait_until(lambda: (t := read_log(settings.data_dir, "fraud_log")).num_rows >= 600 and t, 20,
                       what="600 logged rows")
    assert table.num_rows == 600
    doc = table.to_pydict()
    index = _by_key(table)
    features = [c for c in table.column_names if c in ("amount", "hour", "V22")]
    assert features == ["amount", "hour", "V22"]
    from training.datasets import FRAUD_FEATURES

    logged_x = np.stack([table[name].to_numpy() for name in FRAUD_FEATURES], axis=1)
    for answer in answers:
        start, end = answer["rows"]
        for row in range(end - start):
            i = index[(answer["id"], row)]
            np.testing.assert_array_equal(logged_x[i], x[start + row])  # the features as sent, typed float32
            assert doc["probability"][i] == answer["outputs"][row, 0]  # the answer as the client got it
            assert doc["input_hash"][i] == int(row_hashes(x[start + row][None])[0])
            assert doc["prediction_hash"][i] == int(row_hashes(answer["outputs"][row][None])[0])
    assert set(doc["version"]) == {1} and set(doc["model"]) == {"fraud_log"}
    assert set(doc["date"]) == {time.strftime("%Y-%m-%d", time.gmtime(started))} | \
        {time.strftime("%Y-%m-%d", time.gmtime(finished))}
    stamps = table["timestamp"].cast("int64").to_numpy() / 1e6
    assert stamps.min() >= started - 1 and stamps.max() <= finished + 1
    latency, queue, compute = (table[c].to_numpy() for c in ("latency_us", "queue_us", "compute_us"))
    assert (latency > 0).all() and (queue >= 0).all() and (compute > 0).all()
    assert (queue + compute <= latency + 1).all()  # the split is part of the whole
    assert set(doc["answered_by"]) == {"model"} and set(doc["key_id"]) == {None} and set(doc["violations"]) == {None}
    # Each ingress replica wrote its own files: both did.
    files = list((__import__("pathlib").Path(settings.data_dir) / "traffic" / "fraud_log").rglob("*.parquet"))
    replicas = {f.name.split("-")[1] for f in files}
    assert len(replicas) >= 2, sorted(f.name for f in files)

    # Ray Data and DuckDB read the same folder as one table.
    import duckdb
    import ray.data

    folder = f"{settings.data_dir}/traffic/fraud_log"
    assert ray.data.read_parquet(folder).count() == 600
    count, distinct, version = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT request_id), max(version) FROM read_parquet('{folder}/**/*.parquet', "
        "hive_partitioning = true)").fetchone()
    assert (count, distinct, version) == (600, 300, 1)


def test_sampling_and_redaction_follow_the_models_config(fleet_cluster, base_url):
    """fraud_private logs the requests whose id hashes below 0.5, without `amount`, `distance_km` hashed."""
    settings = fleet_cluster[0]
    x, _ = fraud_rows(300, seed=12)
    ids = [f"private-{i}" for i in range(300)]
    answers = infer_rows(base_url, "fraud_private", x, ids=ids, fresh_connections=False)
    assert all(a["status"] == 200 for a in answers)
    chosen = [i for i, rid in enumerate(ids) if sampled(rid, 0.5)]
    assert 110 < len(chosen) < 190  # about half, by the id's hash: the same on every replica
    table = wait_until(lambda: (t := read_log(settings.data_dir, "fraud_private")).num_rows >= len(chosen) and t, 20,
                       what="the sampled rows logged")
    assert sorted(table["request_id"].to_pylist()) == sorted(ids[i] for i in chosen)
    assert "amount" not in table.column_names and "hour" in table.column_names
    assert table.schema.field("distance_km").type == "uint64"
    by_id = dict(zip(table["request_id"].to_pylist(), table["distance_km"].to_pylist()))
    column = x[:, 3]  # distance_km
    expected = value_hashes(column, 0x5EED_F1EE7)
    assert all(by_id[ids[i]] == int(expected[i]) for i in chosen)
    # The input hash is over the whole row as sent, before redaction: an auditor can still match it.
    hashes = dict(zip(table["request_id"].to_pylist(), table["input_hash"].to_pylist()))
    assert all(hashes[ids[i]] == int(row_hashes(x[i][None])[0]) for i in chosen)


def test_an_image_model_logs_shapes_and_hashes_or_the_pixels_when_configured(fleet_cluster, base_url):
    import httpx

    settings = fleet_cluster[0]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (1, h, w), dtype=np.uint8) for h, w in ((8, 8), (28, 28), (13, 21))]
    with httpx.Client(timeout=30) as client:
        for model in ("digits", "digits_full"):
            for k, image in enumerate(images):
                body = {"id": f"{model}-{k}", "inputs": [{"name": "image", "shape": list(image.shape),
                                                          "datatype": "UINT8", "data": image.ravel().tolist()}]}
                r = client.post(f"{base_url}/v2/models/{model}/infer", json=body)
                assert r.status_code == 200, r.text
    for model in ("digits", "digits_full"):
        table = wait_until(lambda: (t := read_log(settings.data_dir, model)).num_rows >= 3 and t, 20,
                           what=f"{model}'s rows logged")
        rows = {rid: i for i, rid in enumerate(table["request_id"].to_pylist())}
        for k, image in enumerate(images):
            i = rows[f"{model}-{k}"]
            assert table["image_shape"][i].as_py() == list(image.shape[1:])
            assert table["image_hash"][i].as_py() == bytes_hash(image[0].tobytes())
            if model == "digits_full":
                pixels = np.frombuffer(table["image"][i].as_py(), np.uint8).reshape(image.shape[1:])
                np.testing.assert_array_equal(pixels, image[0])
        assert ("image" in table.column_names) == (model == "digits_full")
        assert table.schema.field("probabilities").type.list_size == 10
