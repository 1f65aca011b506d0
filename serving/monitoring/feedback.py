"""`POST /v2/models/{m}/feedback`: the true labels of logged predictions, validated and written to Parquet.

Two body shapes (JSON), authenticated like inference:

    {"labels": [{"id": "r-1", "label": 1}, {"id": "r-2", "row": 3, "label": 0}, {"id": "r-3", "label": [0, 1]}]}

— `id` is the inference request's id (the v2 `id` the client sent, or the one fleet returned), `row`
the row within that request (default 0), and a list label gives every row of a request at once; or
the KServe v2 tensor form (JSON or binary tensors, the same decoder as inference):

    {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [n], "data": [...]},
                {"name": "label", "datatype": "INT64", "shape": [n], "data": [...]},
                {"name": "row", "datatype": "INT32", "shape": [n], "data": [...]}]}      (row optional)

Labels are checked against the model's task (`labels_spec`): a binary classifier (one output value)
takes 0/1 (integers or booleans), a classifier of k classes an integer in [0, k), a regression
(`fleet.task: regression`) any finite number. Anything else is a 400 naming the item and what is
allowed. The same (id, row) twice in one body: the last wins, and the answer counts the duplicates.
Labels may come before their prediction is logged or long after it: they are joined later (the
monitor; the training job), up to `label_window_days`.

Each accepted body is written before the answer, as one Parquet file:

    <data>/labels/<model>/date=<YYYY-MM-DD>/<UTC time>-<replica>-<seq>.parquet
    request_id string, row int32, label int64 (float64 for a regression), received_at timestamp[us, UTC]
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from serving.errors import InvalidInput, PayloadTooLarge, RepositoryError
from serving.limits import over_limit
from serving.protocol import decode_request
from serving.storage import locate, write_whole

__all__ = ["TASK_PARAM", "LabelSpec", "labels_spec", "Labels", "parse_feedback", "LabelWriter"]

TASK_PARAM = "fleet.task"
TASKS = ("binary", "multiclass", "regression")
_INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")


@dataclass(frozen=True)
class LabelSpec:
    """What a model's labels are: its task and, for a classifier, its class count."""

    model: str
    task: str  # "binary" | "multiclass" | "regression"
    classes: int  # 2 for binary, k for multiclass, 0 for regression

    def describe(self) -> str:
        if self.task == "binary":
            return "0 or 1"
        if self.task == "multiclass":
            return f"an integer class in [0, {self.classes})"
        return "a finite number"


def labels_spec(spec) -> LabelSpec:
    """The label a model takes: `fleet.task` if its config says, else from its first output's size."""
    task = spec.parameters.get(TASK_PARAM)
    size = 1
    if spec.outputs:
        dims = [d for d in spec.outputs[0].dims if d != -1]
        size = int(np.prod(dims)) if dims else 1
    if task is None:
        task = "binary" if size == 1 else "multiclass"
    if task not in TASKS:
        raise RepositoryError(f"{spec.name}/config.pbtxt: parameter {TASK_PARAM!r} must be one of {list(TASKS)}, "
                              f"got {task!r}")
    classes = {"binary": 2, "multiclass": max(size, 2), "regression": 0}[task]
    return LabelSpec(spec.name, task, classes)


@dataclass
class Labels:
    """One feedback body, checked: arrays of equal length, duplicates removed (the last kept)."""

    request_id: list[str]
    row: np.ndarray  # int32
    label: np.ndarray  # int64, or float64 for a regression
    duplicates: int

    def __len__(self) -> int:
        return len(self.request_id)


def _check_label(value, where: str, spec: LabelSpec):
    if spec.task == "regression":
        if type(value) not in (int, float) or not math.isfinite(value):
            raise InvalidInput(f"{where}: label must be {spec.describe()} for model {spec.model!r} (a regression), "
                               f"got {value!r}")
        return float(value)
    if type(value) is bool:
        value = int(value)
    if type(value) is not int or not 0 <= value < spec.classes:
        raise InvalidInput(f"{where}: label must be {spec.describe()} for model {spec.model!r} ({spec.task}), "
                           f"got {value!r}")
    return value


def _check_id(value, where: str, max_string: int) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}: 'id' must be a non-empty string (the inference request's id)")
    if len(value.encode("utf-8", "surrogatepass")) > max_string:
        raise InvalidInput(over_limit(f"{where}: an id of {len(value)} characters", max_string, "max_string_bytes",
                                      " bytes"))
    return value


def _from_items(items, spec: LabelSpec, max_labels: int, max_string: int):
    if not isinstance(items, list) or not items:
        raise InvalidInput("'labels' must be a non-empty list of {\"id\": ..., \"label\": ...} objects")
    ids, rows, labels = [], [], []
    for i, item in enumerate(items):
        where = f"labels[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object with 'id' and 'label'")
        unknown = set(item) - {"id", "row", "label"}
        if unknown:
            raise InvalidInput(f"{where}: unknown field(s) {sorted(unknown)}; allowed: id, row, label")
        rid = _check_id(item.get("id"), where, max_string)
        if "label" not in item:
            raise InvalidInput(f"{where}: needs a 'label'")
        value = item["label"]
        if isinstance(value, list):
            if "row" in item:
                raise InvalidInput(f"{where}: a list label gives every row of the request; leave 'row' out")
            if not value:
                raise InvalidInput(f"{where}: a list label needs one label per row of the request")
            for r, v in enumerate(value):
                ids.append(rid)
                rows.append(r)
                labels.append(_check_label(v, f"{where}.label[{r}]", spec))
        else:
            row = item.get("row", 0)
            if type(row) is not int or not 0 <= row < 2**31:
                raise InvalidInput(f"{where}: 'row' must be a non-negative integer (the row within the request)")
            ids.append(rid)
            rows.append(row)
            labels.append(_check_label(value, where, spec))
        if len(ids) > max_labels:
            raise PayloadTooLarge(over_limit("feedback of more labels", max_labels, "max_feedback_labels", ""))
    return ids, rows, labels


def _from_tensors(body: bytes, header_length, spec: LabelSpec, max_labels: int, max_string: int, limits):
    request = decode_request(body, header_length, limits)
    tensors = {t.name: t for t in request.inputs}
    unknown = sorted(set(tensors) - {"id", "label", "row"})
    if unknown or "id" not in tensors or "label" not in tensors:
        raise InvalidInput("feedback tensors: 'id' (BYTES [n]) and 'label' ([n]) are needed, 'row' ([n], integers) "
                           f"is optional; got {sorted(tensors)}")
    id_t, label_t = tensors["id"], tensors["label"]
    if id_t.datatype != "BYTES" or len(id_t.shape) != 1:
        raise InvalidInput(f"feedback tensor 'id' must be BYTES of shape [n], got {id_t.datatype} {list(id_t.shape)}")
    n = id_t.shape[0]
    if n == 0:
        raise InvalidInput("feedback tensor 'id' is empty")
    if n > max_labels:
        raise PayloadTooLarge(over_limit(f"feedback of {n} labels", max_labels, "max_feedback_labels", ""))
    if tuple(label_t.shape) not in ((n,), (n, 1)):
        raise InvalidInput(f"feedback tensor 'label' must have shape [{n}] (one per id), got {list(label_t.shape)}")
    if spec.task != "regression" and label_t.datatype not in _INT_TYPES:
        raise InvalidInput(f"feedback tensor 'label' must be an integer or BOOL tensor for model {spec.model!r} "
                           f"({spec.task}: {spec.describe()}), got {label_t.datatype}")
    if spec.task == "regression" and label_t.datatype == "BYTES":
        raise InvalidInput(f"feedback tensor 'label' must be numeric for model {spec.model!r} (a regression)")
    ids = []
    for i, raw in enumerate(np.asarray(id_t.data).ravel()):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        ids.append(_check_id(text, f"id[{i}]", max_string))
    label = np.asarray(label_t.data).reshape(n)
    if spec.task == "regression":
        label = label.astype(np.float64)
        if not np.isfinite(label).all():
            raise InvalidInput(f"feedback tensor 'label': every label must be {spec.describe()}")
    else:
        label = label.astype(np.int64)
        bad = np.flatnonzero((label < 0) | (label >= spec.classes))
        if bad.size:
            raise InvalidInput(f"label[{int(bad[0])}]: label must be {spec.describe()} for model {spec.model!r} "
                               f"({spec.task}), got {int(label[bad[0]])}")
    rows = np.zeros(n, np.int64)
    if "row" in tensors:
        row_t = tensors["row"]
        if row_t.datatype not in _INT_TYPES[:-1] or tuple(row_t.shape) != (n,):
            raise InvalidInput(f"feedback tensor 'row' must be integers of shape [{n}]")
        rows = np.asarray(row_t.data).reshape(n).astype(np.int64)
        if (rows < 0).any() or (rows >= 2**31).any():
            raise InvalidInput("feedback tensor 'row': rows must be non-negative integers")
    return ids, rows.tolist(), label.tolist()


def parse_feedback(body: bytes, spec: LabelSpec, *, header_length: int | None = None, max_labels: int = 100_000,
                   max_string: int = 1 << 20, limits=None) -> Labels:
    """A feedback body as `Labels` (400/413 with a message for anything wrong), duplicates resolved."""
    if not body:
        raise InvalidInput("empty feedback body: send {\"labels\": [{\"id\": ..., \"label\": ...}]} or v2 tensors "
                           "'id' and 'label'")
    doc = None
    if header_length is None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"malformed JSON in the feedback: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInput("the feedback must be a JSON object with 'labels' (or v2 'inputs')")
    if doc is not None and "labels" in doc:
        extra = set(doc) - {"labels", "id"}
        if extra:
            raise InvalidInput(f"feedback: unknown field(s) {sorted(extra)}; send 'labels'")
        ids, rows, labels = _from_items(doc["labels"], spec, max_labels, max_string)
    elif doc is None or "inputs" in doc:
        if limits is None:
            from serving.limits import RequestLimits

            limits = RequestLimits(max_tensor_elements=max_labels, max_string_bytes=max_string, max_json_depth=32,
                                   max_batch_rows=0)
        ids, rows, labels = _from_tensors(body, header_length, spec, max_labels, max_string, limits)
    else:
        raise InvalidInput("the feedback needs 'labels' (a list of {\"id\", \"label\"}) or v2 'inputs' 'id' and "
                           "'label'")
    latest: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(ids, rows)):
        latest[key] = i  # the last wins
    keep = sorted(latest.values())
    dtype = np.float64 if spec.task == "regression" else np.int64
    return Labels([ids[i] for i in keep], np.asarray([rows[i] for i in keep], np.int32),
                  np.asarray([labels[i] for i in keep], dtype), len(ids) - len(keep))


class LabelWriter:
    """Writes each accepted feedback body as one Parquet file before it is answered: whole (written, then renamed;
    on an object store one object), under a local folder or a URI (`serving.storage`)."""

    def __init__(self, data_dir: str, replica: str):
        location = locate(data_dir)
        self.fs, self.root = location.fs, location.path
        self.replica = replica
        self._seq = itertools.count(1)

    def write(self, model: str, labels: Labels, received_us: int | None = None) -> str:
        """Write `labels` of `model`; return the file's path (in the data folder's filesystem)."""
        received_us = received_us or time.time_ns() // 1000
        table = pa.table({
            "request_id": pa.array(labels.request_id, pa.string()),
            "row": pa.array(labels.row, pa.int32()),
            "label": pa.array(labels.label),
            "received_at": pa.array(np.full(len(labels), received_us, np.int64), pa.timestamp("us", tz="UTC")),
        })
        date = time.strftime("%Y-%m-%d", time.gmtime(received_us / 1e6))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(received_us / 1e6))
        name = f"{stamp}-{received_us % 1_000_000:06d}-{self.replica}-{next(self._seq):06d}.parquet"
        path = f"{self.root}/labels/{model}/date={date}/{name}"
        write_whole(self.fs, path, lambda target: pq.write_table(table, target, filesystem=self.fs,
                                                                 compression="zstd"))
        return path
