"""The rows of the prediction log: what an answered batch becomes, and the Parquet table it is written as.

The request path hands over whole batches (`LogRecord`: arrays and per-request lists, no
per-row Python objects); `LogSchema.table` turns buffered records into one Arrow table off
the hot path, in the writer thread. One row per inference row (a request of k rows is k rows,
`row` 0..k-1), with these columns:

    request_id  string       the v2 request's `id`, or the one fleet generated and returned
    row         int32        the row's index within its request
    timestamp   timestamp[us, UTC]  when the request arrived
    model       string       the model the client asked for (the folder; the version is the partition)
    <features>  float32      for a model with one FP32 [d] input and d metadata `feature_names`: a column
                             each (a feature redacted with `drop` is absent, one with `hash` is uint64)
    <input>     list<...>    any other fixed-shape input, row-major values
    <input>_shape, <input>_hash   an image input (UINT8, any size): list<int32> and uint64; the pixels
                             themselves (`<input>`, binary) only with `fleet.log.inputs: full`
    <output>    float32 for a one-value output, list<float32> (or its type) otherwise
    latency_us, queue_us, compute_us  int64: parse to answer, time queued, the batch's model time
    answered_by string       "model", or "fallback <model>/<version>" (later canary, shadow)
    key_id      string       the first 12 hex digits of the caller's API key's SHA-256 (null: no key)
    input_hash, prediction_hash  uint64  `serving.monitoring.hashing.row_hashes` of the row's raw input
                             (before any redaction) and of its outputs
    violations  string       input-contract rules the row broke in `warn` mode ("amount:range,..."), else null

Per model, in config.pbtxt `parameters`:
- `fleet.log.sample`: share of requests logged, 0..1 (default 1); chosen by a hash of the request id,
  so all rows of a request are in or out together.
- `fleet.log.redact`: `"<feature>=drop,<feature>=hash"`: drop a feature's column, or keep only a
  hash of each value (equal values stay equal, for joins and counts).
- `fleet.log.inputs`: `hash` (default) or `full` for image inputs.
"""

from __future__ import annotations

import itertools
import time
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pyarrow as pa

from serving.errors import RepositoryError
from serving.monitoring.hashing import bytes_hash, row_hashes, value_hashes

__all__ = [
    "SAMPLE_PARAM", "REDACT_PARAM", "INPUTS_PARAM", "LogRecord", "LogSchema", "log_sample", "sampled",
    "parse_redact", "concat_rows", "Parts", "BatchRecord", "records_of", "utc_date", "request_bytes",
]

SAMPLE_PARAM = "fleet.log.sample"
REDACT_PARAM = "fleet.log.redact"
INPUTS_PARAM = "fleet.log.inputs"
_REDACT_SALT = 0x5EED_F1EE7  # hashed features: not the row hash's basis
_UTC_US = pa.timestamp("us", tz="UTC")


@dataclass(slots=True)
class LogRecord:
    """One answered batch (the part of it asked of one model), held as arrays until the writer takes it."""

    model: str
    version: int
    date: str  # YYYY-MM-DD (UTC) of its first request: the partition
    rows: int
    request_ids: list[str]
    request_rows: np.ndarray | list | None  # int32 per request; None: one row each
    arrival_us: np.ndarray | list  # int64 per request: unix time, microseconds
    latency_us: np.ndarray | list  # int64 per request
    queue_us: np.ndarray | list  # int64 per request
    compute_us: int | np.ndarray  # the batch's; or int64 per request for batches merged by `records_of`
    answered_by: str | list[str]
    key_ids: list[str | None] | None  # None: no request carried a key
    # Rows first: an array, `Parts` (the requests' arrays, concatenated by the writer), or for images of any
    # size a list of one array per image.
    inputs: dict[str, np.ndarray | list]
    outputs: dict[str, np.ndarray]
    violations: np.ndarray | None = None  # object [rows]: "feature:rule,..." or None
    nbytes: int = field(default=0)

    def __post_init__(self):
        if not self.nbytes:
            size = sum(a.nbytes if isinstance(a, np.ndarray) else sum(x.nbytes for x in a) for a in self.inputs.values())
            size += sum(a.nbytes for a in self.outputs.values())
            self.nbytes = size + 96 * len(self.request_ids)


class BatchRecord:
    """An answered batch as the request path hands it over: the least work per request (see `VersionObserver`).

    `metas`: each request's context tuple (`serving.monitoring.observe.request_meta`); `enqueued`: each
    one's time.monotonic_ns() in the queue; `inputs`: per input, each request's part in order: its array
    (rows first), or for an input of `images` its images (one array each). `records_of` (in the writer thread)
    concatenates them and derives the per-request columns. `nbytes` counts the arrays' data and, per
    request, its context and its arrays' object headers (what holding them costs).
    """

    __slots__ = ("model", "version", "rows", "metas", "enqueued", "request_rows", "sent_ns", "compute_ns",
                 "done_ns", "inputs", "outputs", "violations", "images", "nbytes")

    def __init__(self, model, version, rows, metas, enqueued, request_rows, sent_ns, compute_ns, done_ns, inputs,
                 outputs, violations=None, images: tuple[str, ...] = (), nbytes: int | None = None):
        self.model, self.version, self.rows = model, version, rows
        self.metas, self.enqueued, self.request_rows = metas, enqueued, request_rows
        self.sent_ns, self.compute_ns, self.done_ns = sent_ns, compute_ns, done_ns
        self.inputs, self.outputs, self.violations, self.images = inputs, outputs, violations, images
        if nbytes is not None:  # the caller counted it (`request_bytes`)
            self.nbytes = nbytes
            return
        size = 0
        for name, parts in inputs.items():
            for part in parts:
                size += sum(img.nbytes for img in part) if name in images else part.nbytes
        self.nbytes = size + (96 + _ARRAY_HEADER * len(inputs)) * len(metas)


_US_NS = 1000
_DAY_US = 86_400_000_000
_ARRAY_HEADER = 112  # bytes of a NumPy array object beside its data


def request_bytes(inputs: int, requests: int, rows: int, row_bytes: int) -> int:
    """`BatchRecord.nbytes` of `requests` requests of `rows` rows in all, `inputs` fixed-shape inputs of
    `row_bytes` bytes a row together: what the loop in `BatchRecord` counts, without the loop."""
    return rows * row_bytes + (96 + _ARRAY_HEADER * inputs) * requests


def records_of(batches: list[BatchRecord], wall_offset_ns: int) -> list[LogRecord]:
    """The answered batches a flush takes, as one `LogRecord` per model version and UTC date (a batch's date:
    its first request's), every per-request column derived in one pass over all of them (a fixed cost per
    batch would be most of the work: at peak most batches hold a few rows). The batches keep their order."""
    groups: dict[tuple[str, int, int], list[BatchRecord]] = {}
    for b in batches:
        day = (b.metas[0][1] + wall_offset_ns) // (_US_NS * _DAY_US)
        groups.setdefault((b.model, b.version, day), []).append(b)
    records: list[LogRecord] = []
    for (model, version, _day), group in groups.items():
        # One loop over the batches (per-batch generator expressions were most of a flush's time), then whole arrays.
        metas: list[tuple] = []
        enqueued_ns: list[int] = []
        per_batch, batch_ns, rows, nbytes = [], [], 0, 0
        counted = flagged = False
        for b in group:
            metas += b.metas
            enqueued_ns += b.enqueued
            per_batch.append(len(b.metas))
            batch_ns.append((b.sent_ns, b.compute_ns, b.done_ns))
            rows += b.rows
            nbytes += b.nbytes
            counted = counted or b.request_rows is not None
            flagged = flagged or b.violations is not None
        n = len(metas)
        plain = all(len(m) == 2 for m in metas)
        if plain:
            ids, starts = zip(*metas)
            ids = list(ids)
        else:
            ids, starts = [m[0] for m in metas], [m[1] for m in metas]
        start = np.array(starts, np.int64)
        arrival_us = (start + wall_offset_ns) // _US_NS
        sent, compute, done = np.repeat(np.array(batch_ns, np.int64).reshape(-1, 3), per_batch, axis=0).T
        keys = answered = None
        if not plain:
            keys = [m[2] if len(m) > 2 else None for m in metas]
            answered = [m[3] if len(m) > 2 else "model" for m in metas]
            keys = None if keys.count(None) == n else keys
            answered = answered[0] if answered.count(answered[0]) == n else answered
        request_rows = None
        if counted:
            request_rows = np.concatenate([np.asarray(b.request_rows, np.int32) if b.request_rows is not None
                                           else np.ones(len(b.metas), np.int32) for b in group])
        violations = None
        if flagged:
            violations = np.concatenate([b.violations if b.violations is not None else np.full(b.rows, None, object)
                                         for b in group])
        inputs = {}
        for name in group[0].inputs:
            parts = itertools.chain.from_iterable(b.inputs[name] for b in group)
            if name not in group[0].images:
                inputs[name] = Parts(parts)
            else:  # images: one array per image
                inputs[name] = [img for part in parts for img in part]
        outputs = {name: np.asarray(first_value) if len(group) == 1 else np.concatenate(
                   [np.asarray(b.outputs[name]) for b in group]) for name, first_value in group[0].outputs.items()}
        records.append(LogRecord(
            model=model, version=version, date=utc_date(int(arrival_us[0])), rows=rows, request_ids=ids,
            request_rows=request_rows, arrival_us=arrival_us, latency_us=(done - start) // _US_NS,
            queue_us=(sent - np.array(enqueued_ns, np.int64)) // _US_NS, compute_us=compute // _US_NS,
            answered_by=answered or "model", key_ids=keys, inputs=inputs, outputs=outputs, violations=violations,
            nbytes=nbytes))
    return records
_DATES: dict[int, str] = {}


def utc_date(unix_us: int) -> str:
    """YYYY-MM-DD (UTC) of a time in unix microseconds, formatted once per day."""
    day = unix_us // 86_400_000_000
    text = _DATES.get(day)
    if text is None:
        if len(_DATES) > 64:
            _DATES.clear()
        text = _DATES[day] = time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))
    return text


class Parts(list):
    """A `LogRecord` input held as its requests' arrays, not yet concatenated (the writer thread does it)."""


def _parts(value) -> list:
    """A record's input as a list of row blocks: its Parts, or the one array it is."""
    return value if isinstance(value, Parts) else [value]


def concat_rows(parts: list, images: bool):
    """Per-request arrays as one: concatenated rows, or for images of any size a flat list of them."""
    if images:
        return [img for part in parts for img in part]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def log_sample(parameters: Mapping[str, str], source: str = "config.pbtxt") -> float:
    """`fleet.log.sample` as a share in [0, 1] (default 1)."""
    raw = parameters.get(SAMPLE_PARAM, "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise RepositoryError(f"{source}: parameter {SAMPLE_PARAM!r} must be a number in [0, 1], got {raw!r}")
    return value


def sampled(request_id: str, share: float) -> bool:
    """Whether the request with this id is logged at `share`: a stable hash of the id, not a coin per replica."""
    if share >= 1.0:
        return True
    return share > 0.0 and zlib.crc32(request_id.encode("utf-8", "surrogatepass")) < share * 4294967296.0


def parse_redact(raw: str | None, names: list[str], source: str = "config.pbtxt") -> dict[str, str]:
    """`"f1=drop,f2=hash"` -> {feature: "drop" | "hash"}; names must be the model's features."""
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, how = item.partition("=")
        name, how = name.strip(), how.strip()
        if how not in ("drop", "hash"):
            raise RepositoryError(f"{source}: {REDACT_PARAM} entries are '<feature>=drop' or '<feature>=hash', "
                                  f"got {item!r}")
        if name not in names:
            raise RepositoryError(f"{source}: {REDACT_PARAM} names {name!r}, which is not one of the model's "
                                  f"logged inputs {names}")
        out[name] = how
    return out


def _flat_int64(lists) -> np.ndarray:
    """The per-request values of several records (lists or arrays) as one int64 array."""
    return np.fromiter(itertools.chain.from_iterable(lists), np.int64)


def _expand(values, counts: np.ndarray | None):
    """Per-request values repeated for each of its rows."""
    if counts is None:
        return values
    return np.repeat(np.asarray(values, dtype=object) if isinstance(values, list) else values, counts)


class LogSchema:
    """How one model version's batches become log rows (built once per version, used by the writer thread).

    `spec` is the model's ModelSpec, `metadata` its version's metadata.json (feature names), `image_inputs`
    the inputs of any size fleet resizes (logged as shape and hash unless `fleet.log.inputs: full`).
    """

    def __init__(self, spec, metadata: Mapping | None, image_inputs: tuple[str, ...] = ()):
        source = f"{spec.name}/config.pbtxt"
        self.sample = log_sample(spec.parameters, source)
        mode = spec.parameters.get(INPUTS_PARAM, "hash")
        if mode not in ("hash", "full"):
            raise RepositoryError(f"{source}: parameter {INPUTS_PARAM!r} must be 'hash' or 'full', got {mode!r}")
        self.full_images = mode == "full"
        self.image_inputs = tuple(image_inputs)
        self.features: dict[str, list[str]] = {}  # input -> its feature names (one column each)
        names = list((metadata or {}).get("feature_names") or [])
        for t in spec.inputs:
            if t.datatype == "FP32" and len(t.dims) == 1 and names and len(names) == t.dims[0] \
                    and t.name not in self.image_inputs:
                self.features[t.name] = names
        loggable = [n for cols in self.features.values() for n in cols] + [t.name for t in spec.inputs]
        self.redact = parse_redact(spec.parameters.get(REDACT_PARAM), loggable, source)

    def _input_columns(self, name: str, values, cols: dict) -> None:
        if name in self.image_inputs:
            images = values if isinstance(values, list) else list(values)
            cols[f"{name}_shape"] = pa.array([list(img.shape) for img in images], pa.list_(pa.int32()))
            cols[f"{name}_hash"] = pa.array([bytes_hash(np.ascontiguousarray(img).tobytes()) for img in images],
                                            pa.uint64())
            if self.full_images and self.redact.get(name) != "drop":
                cols[name] = pa.array([np.ascontiguousarray(img).tobytes() for img in images], pa.binary())
            return
        arr = np.asarray(values)
        names = self.features.get(name)
        if names is not None:
            columns = np.ascontiguousarray(arr.T)  # each feature's values contiguous: Arrow takes them as they are
            for j, feature in enumerate(names):
                how = self.redact.get(feature)
                if how == "drop":
                    continue
                cols[feature] = pa.array(value_hashes(columns[j], _REDACT_SALT) if how == "hash" else columns[j])
            return
        how = self.redact.get(name)
        if how == "drop":
            return
        flat = arr.reshape(len(arr), -1)
        if how == "hash":
            cols[name] = pa.array(row_hashes(flat, _REDACT_SALT))
        elif flat.dtype == object:
            cols[name] = pa.array([list(r) for r in flat])
        else:
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])

    def table(self, records: list[LogRecord]) -> pa.Table:
        """The rows of `records` (one model version) as one Arrow table, in arrival order of the batches."""
        counts = None
        if any(r.request_rows is not None for r in records):
            counts = np.concatenate([np.asarray(r.request_rows, np.int32) if r.request_rows is not None
                                     else np.ones(len(r.request_ids), np.int32) for r in records])
        ids = [i for r in records for i in r.request_ids]
        rows = (np.concatenate([np.arange(c, dtype=np.int32) for c in counts]) if counts is not None
                else np.zeros(len(ids), np.int32))
        per_request = {  # one conversion each over all the records' lists
            "arrival": _flat_int64(r.arrival_us for r in records),
            "latency": _flat_int64(r.latency_us for r in records),
            "queue": _flat_int64(r.queue_us for r in records),
            "compute": (np.repeat(np.fromiter((r.compute_us for r in records), np.int64, len(records)),
                                  [len(r.request_ids) for r in records])
                        if all(np.ndim(r.compute_us) == 0 for r in records) else
                        np.concatenate([np.full(len(r.request_ids), r.compute_us, np.int64)
                                        if np.ndim(r.compute_us) == 0 else np.asarray(r.compute_us, np.int64)
                                        for r in records])),
        }
        answered = None if all(isinstance(r.answered_by, str) and r.answered_by == records[0].answered_by
                               for r in records) else [
            a for r in records for a in (r.answered_by if isinstance(r.answered_by, list)
                                         else [r.answered_by] * len(r.request_ids))]
        keys = None if all(r.key_ids is None for r in records) else [
            k for r in records for k in (r.key_ids if r.key_ids is not None else [None] * len(r.request_ids))]
        cols: dict = {
            "request_id": pa.array(_expand(ids, counts), pa.string()),
            "row": pa.array(rows),
            "timestamp": pa.array(_expand(per_request["arrival"], counts), _UTC_US),
            "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(rows), np.int32)),
                                                    pa.array([records[0].model])),
        }
        raw_inputs: dict[str, object] = {}
        for name in records[0].inputs:
            parts = [block for r in records for block in _parts(r.inputs[name])]
            raw_inputs[name] = concat_rows(parts, name in self.image_inputs)
            self._input_columns(name, raw_inputs[name], cols)
        outputs = {name: (np.asarray(records[0].outputs[name]) if len(records) == 1
                          else np.concatenate([np.asarray(r.outputs[name]) for r in records]))
                   for name in records[0].outputs}
        for name, arr in outputs.items():
            flat = arr.reshape(len(arr), -1)
            cols[name] = (pa.array(flat[:, 0]) if flat.shape[1] == 1
                          else pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]))
        cols["latency_us"] = pa.array(_expand(per_request["latency"], counts))
        cols["queue_us"] = pa.array(_expand(per_request["queue"], counts))
        cols["compute_us"] = pa.array(_expand(per_request["compute"], counts))
        if answered is None:  # one value for every row (the usual case): a dictionary of it
            cols["answered_by"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(rows), np.int32)),
                                                                 pa.array([records[0].answered_by], pa.string()))
        else:
            cols["answered_by"] = pa.array(_expand(answered, counts), pa.string()).dictionary_encode()
        cols["key_id"] = pa.nulls(len(rows), pa.string()) if keys is None else pa.array(_expand(keys, counts),
                                                                                        pa.string())
        cols["input_hash"] = pa.array(self._input_hashes(raw_inputs, len(rows)), pa.uint64())
        cols["prediction_hash"] = pa.array(self._row_hash_of(list(outputs.values()), len(rows)), pa.uint64())
        if any(r.violations is not None for r in records):
            violations = [r.violations if r.violations is not None else np.full(r.rows, None, object) for r in records]
            cols["violations"] = pa.array(np.concatenate(violations), pa.string())
        else:
            cols["violations"] = pa.nulls(len(rows), pa.string())
        return pa.table(cols)

    def _input_hashes(self, raw_inputs: dict, rows: int) -> np.ndarray:
        images = [n for n in raw_inputs if n in self.image_inputs]
        fixed = [np.asarray(raw_inputs[n]) for n in raw_inputs if n not in self.image_inputs]
        h = self._row_hash_of(fixed, rows) if fixed else None
        for name in images:
            per_image = np.array([bytes_hash(np.ascontiguousarray(img).tobytes()) for img in raw_inputs[name]],
                                 np.uint64)
            h = per_image if h is None else row_hashes(np.stack([h, per_image], axis=1))
        return h if h is not None else np.zeros(rows, np.uint64)

    @staticmethod
    def _row_hash_of(arrays: list[np.ndarray], rows: int) -> np.ndarray:
        """One hash per row over the row's bytes of every array, in order."""
        flats = [np.ascontiguousarray(a).reshape(rows, -1).view(np.uint8).reshape(rows, -1) for a in arrays
                 if np.asarray(a).dtype != object]
        if not flats:
            return np.zeros(rows, np.uint64)
        return row_hashes(flats[0] if len(flats) == 1 else np.concatenate(flats, axis=1))
