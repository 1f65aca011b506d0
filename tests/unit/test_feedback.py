"""Feedback bodies: both shapes, the model's label type, duplicates (the last wins), and the file written."""

from __future__ import annotations

import orjson
import pyarrow.parquet as pq
import pytest

from serving.errors import InvalidInput, PayloadTooLarge, RepositoryError
from serving.model_config import TensorSpec
from serving.monitoring.feedback import LabelWriter, labels_spec, parse_feedback


def spec(outputs, parameters=None):
    class Spec:
        name = "m"
    Spec.outputs = outputs
    Spec.parameters = parameters or {}
    return Spec


BINARY = labels_spec(spec((TensorSpec("p", "FP32", (1,)),)))
CLASSES = labels_spec(spec((TensorSpec("p", "FP32", (10,)),)))
REGRESSION = labels_spec(spec((TensorSpec("y", "FP32", (1,)),), {"fleet.task": "regression"}))


def test_the_task_follows_the_output_unless_the_config_says():
    assert (BINARY.task, BINARY.classes) == ("binary", 2)
    assert (CLASSES.task, CLASSES.classes) == ("multiclass", 10)
    assert REGRESSION.task == "regression"
    with pytest.raises(RepositoryError, match="fleet.task"):
        labels_spec(spec((TensorSpec("p", "FP32", (1,)),), {"fleet.task": "ranking"}))


def test_items_lists_and_tensors_give_the_same_labels_and_the_last_duplicate_wins():
    items = parse_feedback(orjson.dumps({"labels": [{"id": "a", "label": 1}, {"id": "b", "row": 2, "label": True},
                                                    {"id": "c", "label": [0, 1]}, {"id": "a", "label": 0}]}), BINARY)
    assert items.request_id == ["b", "c", "c", "a"] and items.row.tolist() == [2, 0, 1, 0]
    assert items.label.tolist() == [1, 0, 1, 0] and items.duplicates == 1 and str(items.label.dtype) == "int64"
    tensors = parse_feedback(orjson.dumps({"inputs": [
        {"name": "id", "datatype": "BYTES", "shape": [3], "data": ["x", "y", "x"]},
        {"name": "label", "datatype": "INT32", "shape": [3], "data": [7, 3, 9]},
        {"name": "row", "datatype": "INT64", "shape": [3], "data": [0, 0, 0]}]}), CLASSES)
    assert tensors.request_id == ["y", "x"] and tensors.label.tolist() == [3, 9] and tensors.duplicates == 1
    reg = parse_feedback(b'{"labels": [{"id": "r", "label": 2.5}, {"id": "s", "label": -1}]}', REGRESSION)
    assert reg.label.tolist() == [2.5, -1.0] and str(reg.label.dtype) == "float64"


@pytest.mark.parametrize("body, task, message", [
    ({"labels": [{"id": "a", "label": 2}]}, BINARY, "label must be 0 or 1"),
    ({"labels": [{"id": "a", "label": 10}]}, CLASSES, "an integer class in [0, 10)"),
    ({"labels": [{"id": "a", "label": -1}]}, CLASSES, "got -1"),
    ({"labels": [{"id": "a", "label": "x"}]}, REGRESSION, "a finite number"),
    ({"labels": [{"id": "a", "label": 1, "row": -1}]}, BINARY, "'row' must be a non-negative integer"),
    ({"labels": [{"id": "a", "label": [1], "row": 0}]}, BINARY, "leave 'row' out"),
    ({"labels": [{"id": "", "label": 1}]}, BINARY, "non-empty string"),
    ({"labels": [{"label": 1}]}, BINARY, "non-empty string"),
    ({"labels": [{"id": "a"}]}, BINARY, "needs a 'label'"),
    ({"labels": "a"}, BINARY, "non-empty list"),
    ({"labels": [{"id": "a", "label": 1}], "other": 1}, BINARY, "unknown field(s) ['other']"),
    ({"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "data": [1]},
                 {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}]}, BINARY, "must be BYTES"),
    ({"inputs": [{"name": "id", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, BINARY, "'id' (BYTES [n]) and"),
    ({"inputs": [{"name": "id", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                 {"name": "label", "datatype": "INT64", "shape": [1], "data": [5]}]}, BINARY, "label[0]"),
])
def test_a_wrong_label_or_body_is_an_invalid_input_that_says_what_is_wrong(body, task, message):
    with pytest.raises(InvalidInput) as info:
        parse_feedback(orjson.dumps(body), task)
    assert message in str(info.value)


def test_too_many_labels_is_413_and_malformed_json_400():
    with pytest.raises(PayloadTooLarge, match="max_feedback_labels"):
        parse_feedback(orjson.dumps({"labels": [{"id": f"{i}", "label": 0} for i in range(11)]}), BINARY,
                       max_labels=10)
    with pytest.raises(InvalidInput, match="malformed JSON"):
        parse_feedback(b"{", BINARY)


def test_the_writer_writes_one_whole_file_per_body(tmp_path):
    labels = parse_feedback(b'{"labels": [{"id": "a", "label": 1}, {"id": "b", "label": 0}]}', BINARY)
    path = LabelWriter(str(tmp_path), "r9").write("m", labels, received_us=1_764_979_200_000_000)
    assert "/labels/m/date=2025-12-06/" in path and path.endswith("-r9-000001.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["request_id", "row", "label", "received_at"]
    assert table["request_id"].to_pylist() == ["a", "b"] and table["label"].to_pylist() == [1, 0]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary file left
