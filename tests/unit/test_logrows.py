"""What a logged batch becomes: one row per inference row, typed columns, redaction, images, hashes, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import RepositoryError
from serving.model_config import TensorSpec
from serving.monitoring.hashing import bytes_hash, row_hashes, value_hashes
from serving.monitoring.logrows import LogRecord, LogSchema, log_sample, parse_redact, sampled


def spec(parameters=None, inputs=None, outputs=None):
    class Spec:
        name = "m"
    Spec.parameters = parameters or {}
    Spec.inputs = inputs or (TensorSpec("features", "FP32", (3,)),)
    Spec.outputs = outputs or (TensorSpec("probability", "FP32", (1,)),)
    return Spec


def rec(ids, counts, x, out, **kw) -> LogRecord:
    n = len(ids)
    return LogRecord(model="m", version=1, date="2026-12-05", rows=len(x), request_ids=ids,
                     request_rows=None if counts is None else np.asarray(counts, np.int32),
                     arrival_us=np.arange(n, dtype=np.int64) + 1_700_000_000_000_000,
                     latency_us=np.full(n, 800, np.int64), queue_us=np.full(n, 50, np.int64), compute_us=300,
                     answered_by=kw.pop("answered_by", "model"), key_ids=kw.pop("key_ids", None),
                     inputs={"features": x} if "inputs" not in kw else kw.pop("inputs"), outputs={"probability": out},
                     **kw)


def test_requests_of_several_rows_become_one_row_each_with_their_index_and_hashes():
    schema = LogSchema(spec(), {"feature_names": ["a", "b", "c"]})
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    out = np.linspace(0, 1, 5, dtype=np.float32)[:, None]
    table = schema.table([rec(["r1", "r2"], [2, 1], x[:3], out[:3], key_ids=["abc123abc123", None]),
                          rec(["r3"], [2], x[3:], out[3:], answered_by="fallback other/1")])
    doc = table.to_pydict()
    assert doc["request_id"] == ["r1", "r1", "r2", "r3", "r3"] and doc["row"] == [0, 1, 0, 0, 1]
    assert doc["a"] == [0.0, 3.0, 6.0, 9.0, 12.0] and doc["probability"] == pytest.approx(out[:, 0].tolist())
    assert doc["key_id"] == ["abc123abc123", "abc123abc123", None, None, None]
    assert doc["answered_by"] == ["model"] * 3 + ["fallback other/1"] * 2
    assert doc["input_hash"] == [int(h) for h in row_hashes(x)]
    assert doc["prediction_hash"] == [int(h) for h in row_hashes(out)]
    assert doc["compute_us"] == [300] * 5 and doc["latency_us"] == [800] * 5 and doc["violations"] == [None] * 5
    assert str(table.schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    assert table.schema.field("a").type == "float" and table.schema.field("row").type == "int32"


def test_redaction_drops_or_hashes_named_features_but_the_input_hash_covers_the_whole_row():
    schema = LogSchema(spec({"fleet.log.redact": "a=drop, c=hash"}), {"feature_names": ["a", "b", "c"]})
    x = np.array([[1.5, 2.5, 3.5], [1.5, 0.0, 3.5]], np.float32)
    table = schema.table([rec(["p", "q"], None, x, np.zeros((2, 1), np.float32))])
    assert "a" not in table.column_names and table["b"].to_pylist() == [2.5, 0.0]
    c = table["c"].to_pylist()
    assert c[0] == c[1] == int(value_hashes(x[:1, 2], 0x5EED_F1EE7)[0]) and c[0] != int(row_hashes(x[:1, 2:])[0])
    assert table["input_hash"].to_pylist() == [int(h) for h in row_hashes(x)]


def test_image_inputs_are_logged_as_shape_and_hash_or_whole_when_configured():
    inputs = (TensorSpec("image", "UINT8", (-1, -1)),)
    outputs = (TensorSpec("probabilities", "FP32", (10,)),)
    images = [np.full((4, 5), 7, np.uint8), np.arange(6, dtype=np.uint8).reshape(2, 3)]
    probs = np.eye(10, dtype=np.float32)[:2]
    for mode in ("hash", "full"):
        schema = LogSchema(spec({"fleet.log.inputs": mode}, inputs, outputs), {}, image_inputs=("image",))
        record = rec(["i1", "i2"], None, probs, probs, inputs={"image": images})
        record.outputs = {"probabilities": probs}
        table = schema.table([record])
        assert table["image_shape"].to_pylist() == [[4, 5], [2, 3]]
        assert table["image_hash"].to_pylist() == [bytes_hash(img.tobytes()) for img in images]
        assert table.schema.field("probabilities").type.list_size == 10
        if mode == "full":
            assert table["image"].to_pylist() == [img.tobytes() for img in images]
        else:
            assert "image" not in table.column_names


def test_sampling_is_a_stable_function_of_the_id_and_its_share_holds():
    ids = [f"id-{i}" for i in range(20_000)]
    chosen = [sampled(i, 0.1) for i in ids]
    assert chosen == [sampled(i, 0.1) for i in ids]  # the same answer on every replica
    assert abs(sum(chosen) / len(ids) - 0.1) < 0.01
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids[:100])


@pytest.mark.parametrize("raw, message", [("a=keep", "'<feature>=drop'"), ("zz=drop", "not one of the model's")])
def test_a_bad_redaction_or_sample_names_the_parameter(raw, message):
    with pytest.raises(RepositoryError, match=message):
        parse_redact(raw, ["a", "b"])
    with pytest.raises(RepositoryError, match="fleet.log.sample"):
        log_sample({"fleet.log.sample": "1.5"})


def _batch(model, version, metas, x, out, *, request_rows=None, violations=None, start_ns=5_000_000_000):
    from serving.monitoring.logrows import BatchRecord

    n = len(metas)
    parts = np.split(x, np.cumsum(request_rows or [1] * n)[:-1])  # each request's own array, as the batcher has them
    return BatchRecord(model, version, len(x), metas, [start_ns + 10_000 * i for i in range(n)], request_rows,
                       start_ns + 900_000, 250_000 + n * 1_000, start_ns + 1_400_000, {"features": parts},
                       {"probability": out}, violations)


def test_a_flush_merges_its_batches_into_the_same_rows_as_one_record_per_batch():
    """`records_of` (every batch of a flush at once) writes exactly the table of each batch on its own, one after
    the other: keys, fallbacks, requests of several rows, contract flags and two versions mixed, order kept."""
    from serving.monitoring.logrows import records_of

    rng = np.random.default_rng(3)
    offset = 1_796_000_000_000_000_000 - 5_000_000_000  # unix ns of monotonic 0

    def x(n):
        return rng.standard_normal((n, 3)).astype(np.float32)

    def out(n):
        return rng.random((n, 1)).astype(np.float32)

    batches = [
        _batch("m", 1, [("a-1", 4_999_000_000), ("a-2", 4_999_500_000)], x(2), out(2)),
        _batch("m", 2, [("b-1", 4_999_100_000)], x(1), out(1)),
        _batch("m", 1, [("c-1", 4_999_600_000, "abcdefabcdef", "model", None, None),
                        ("c-2", 4_999_700_000)], x(3), out(3), request_rows=[2, 1],
               violations=np.array(["a:range", None, None], object)),
        _batch("m", 1, [("d-1", 4_999_800_000, None, "fallback other/3", "other", 3)], x(1), out(1)),
        _batch("m", 2, [("e-1", 4_999_900_000)], x(2), out(2), request_rows=[2]),
    ]
    merged = records_of(batches, offset)
    assert [(r.model, r.version, r.rows) for r in merged] == [("m", 1, 6), ("m", 2, 3)]
    assert sum(r.nbytes for r in merged) == sum(b.nbytes for b in batches)  # the buffer's accounting holds
    schema = LogSchema(spec(), {"feature_names": ["a", "b", "c"]})
    for record in merged:
        one_by_one = [r for b in batches if b.version == record.version for r in records_of([b], offset)]
        assert schema.table([record]).equals(schema.table(one_by_one))
        assert record.date == one_by_one[0].date == "2026-11-30"
    doc = schema.table([merged[0]]).to_pydict()
    assert doc["request_id"] == ["a-1", "a-2", "c-1", "c-1", "c-2", "d-1"]
    assert doc["key_id"] == [None, None, "abcdefabcdef", "abcdefabcdef", None, None]
    assert doc["answered_by"] == ["model"] * 5 + ["fallback other/3"]
    assert doc["violations"] == [None, None, "a:range", None, None, None]
    assert doc["latency_us"][:2] == [2400, 1900] and doc["queue_us"][:2] == [900, 890]


def test_a_flush_across_midnight_keeps_each_batch_in_its_own_days_partition():
    from serving.monitoring.logrows import records_of

    day_ns = 86_400 * 10**9
    offset = 20_424 * day_ns - 5_000_000_000  # monotonic 5 s is midnight UTC
    batches = [_batch("m", 1, [("late", 4_999_000_000)], np.ones((1, 3), np.float32), np.ones((1, 1), np.float32)),
               _batch("m", 1, [("early", 5_001_000_000)], np.ones((1, 3), np.float32), np.ones((1, 1), np.float32),
                      start_ns=5_001_000_000)]
    records = records_of(batches, offset)
    assert [(r.date, r.request_ids) for r in records] == [("2025-12-01", ["late"]), ("2025-12-02", ["early"])]


def test_request_bytes_counts_what_a_batch_record_counts_of_its_arrays():
    from serving.monitoring.logrows import BatchRecord, request_bytes

    parts = [np.zeros((2, 30), np.float32), np.zeros((1, 30), np.float32)]
    counted = BatchRecord("m", 1, 3, [("a", 0), ("b", 0)], [0, 0], [2, 1], 0, 0, 0, {"features": parts},
                          {"probability": np.zeros((3, 1), np.float32)})
    assert counted.nbytes == request_bytes(1, 2, 3, 30 * 4)  # the observer's shortcut for fixed shapes
    images = BatchRecord("m", 1, 2, [("a", 0)], [0], [2], 0, 0, 0, {"image": [[np.zeros((8, 8), np.uint8),
                                                                              np.zeros((3, 5), np.uint8)]]},
                         {"probability": np.zeros((2, 10), np.float32)}, images=("image",))
    assert images.nbytes == 64 + 15 + 96 + 112
