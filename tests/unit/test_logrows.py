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
