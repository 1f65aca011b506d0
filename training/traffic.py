"""Logged traffic joined with its labels: the requests a served model answered and was later told the truth about.

The serving cluster writes (the contract this module reads):

    <data>/traffic/<served model>/version=<v>/date=<YYYY-MM-DD>/*.parquet   the prediction log
    <data>/labels/<served model>/date=<YYYY-MM-DD>/*.parquet                labels (POST /v2/models/{m}/feedback)

A log row is keyed by (`request_id`, `row`: the row's index in its request) and carries its
`timestamp` and the model's inputs as logged: one float32 column per feature name for a
tabular model, `<input>` (raw uint8 pixels, C order) and `<input>_shape` for an image model
whose config logs inputs in full. A label row is (`request_id`, `row`, `label`, `received_at`).

What `read_labelled_traffic` does, all in pyarrow (no loop over rows):
1. Checks every file's schema (its footer only): a file without the columns a model trains on
   (a redacted feature is missing or logged as a uint64 hash; an image logged by hash only) or
   that cannot be read is skipped, with its path, row count and reason in the report (so is a
   file whose rows then fail to read or cast).
2. Reads the usable files as one hive-partitioned dataset (`version` and `date` come from the
   folders), the columns cast to one schema.
3. Dedupes: a (request_id, row) labelled more than once keeps its latest `received_at` (ties:
   the later file, in path order); a prediction logged twice keeps its first `timestamp`.
4. Joins predictions and labels on (request_id, row), keeps the pairs whose label came within
   `window_days` of the prediction (either side: a label may be posted before its log row is
   written) and whose label is a class of the model (0 .. classes - 1).

Everything counted on the way (unlabelled predictions, labels without a prediction, pairs
outside the window, invalid labels, rows without a key, skipped files and why) goes into the
report that metadata.json records under `training_data.traffic`, with the files read, the
`joined_rows` and, per version, their count and date range.

`<data>` is a local folder or a URI (`serving.storage`: s3://bucket/data?region=...): the files
are listed and read through its pyarrow filesystem, and named by their path in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serving.monitoring.join import last_per_key
from serving.storage import join_uri, list_files, locate

__all__ = [
    "KEYS", "DEFAULT_LABEL_WINDOW_DAYS", "LogColumns", "feature_columns", "image_columns", "LabelledTraffic",
    "read_labelled_traffic", "traffic_folder", "labels_folder", "decode_images", "summarize",
]  # fmt: skip

KEYS = ["request_id", "row"]
DEFAULT_LABEL_WINDOW_DAYS = 14.0
_SHOWN_SKIPS = 5
_HIVE_LOG = ds.partitioning(pa.schema([("version", pa.int64()), ("date", pa.string())]), flavor="hive")
_HIVE_LABELS = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
_LOG_KEYS = {"request_id": pa.string(), "row": pa.int64(), "timestamp": pa.timestamp("us", tz="UTC")}
_LABEL_SCHEMA = pa.schema([("request_id", pa.string()), ("row", pa.int64()), ("label", pa.int64()),
                           ("received_at", pa.timestamp("us", tz="UTC")), ("date", pa.string())])


@dataclass(frozen=True)
class LogColumns:
    """The log columns a model trains on: their names and types, and why a file's schema falls short (or None)."""

    fields: tuple[tuple[str, pa.DataType], ...]
    problem: Callable[[pa.Schema], str | None]
    describe: str


def feature_columns(names: list[str]) -> LogColumns:
    """A tabular model's features: one float column each (float32 in the log)."""

    def problem(schema: pa.Schema) -> str | None:
        hashed = [n for n in names if n in schema.names and pa.types.is_unsigned_integer(schema.field(n).type)]
        if hashed:
            return f"feature(s) {_some(hashed)} redacted (logged as uint64 hashes): rows cannot train"
        missing = [n for n in names if n not in schema.names]
        if missing:
            return f"feature column(s) {_some(missing)} missing (redacted, or logged by a model with other features)"
        wrong = [f"{n} ({schema.field(n).type})" for n in names if not pa.types.is_floating(schema.field(n).type)]
        return f"feature column(s) {_some(wrong)} are not floats" if wrong else None

    return LogColumns(tuple((n, pa.float32()) for n in names), problem, f"{len(names)} float feature columns")


def image_columns(name: str) -> LogColumns:
    """An image input logged in full: `<name>` (binary, uint8 pixels) and `<name>_shape` (list of ints)."""
    shape = f"{name}_shape"

    def problem(schema: pa.Schema) -> str | None:
        if name not in schema.names:
            if f"{name}_hash" in schema.names:
                return (f"images logged as hashes only ({name}_hash): set `fleet.log.inputs: full` in the "
                        "model's config to train on its traffic")
            return f"no {name!r} column: not this model's log"
        kind = schema.field(name).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            return f"column {name!r} is {kind}, not binary pixels"
        if shape not in schema.names or not pa.types.is_list(schema.field(shape).type):
            return f"no {shape!r} list column: the images' shapes are unknown"
        return None

    return LogColumns(((name, pa.binary()), (shape, pa.list_(pa.int64()))), problem, f"{name!r} images in full")


def _some(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass
class LabelledTraffic:
    """The joined rows (the log columns asked for, `version`, `date`, `timestamp`, `label`, `received_at`), the
    files they came from and the report."""

    table: pa.Table
    traffic_files: tuple[str, ...] = ()
    label_files: tuple[str, ...] = ()
    report: dict = field(default_factory=dict)
    stamps: np.ndarray | None = None  # unix µs of each prediction of the rows a caller kept (fraud_traffic's)

    @property
    def rows(self) -> int:
        return self.table.num_rows


def traffic_folder(root: str | Path, model: str) -> str:
    """The served model's log folder (a path, or a URI when the data folder is one)."""
    return join_uri(str(root), "traffic", model)


def labels_folder(root: str | Path, model: str) -> str:
    return join_uri(str(root), "labels", model)


def _screen(files: list[str], problem: Callable[[pa.Schema], str | None],
            fs: pafs.FileSystem) -> tuple[list[str], list[dict]]:
    """(usable files, [{path, rows, reason}] of the skipped ones), from each file's footer."""
    usable, skipped = [], []
    for path in files:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
            reason = problem(meta.schema.to_arrow_schema())
            rows = meta.num_rows
        except (OSError, pa.ArrowException) as exc:
            reason, rows = f"unreadable parquet ({exc})", None
        if reason is None:
            usable.append(path)
        else:
            skipped.append({"path": path, "rows": rows, "reason": reason})
    return usable, skipped


def _log_problem(columns: LogColumns) -> Callable[[pa.Schema], str | None]:
    def problem(schema: pa.Schema) -> str | None:
        missing = [k for k in _LOG_KEYS if k not in schema.names]
        if missing:
            return f"not a prediction log file: lacks {missing}"
        if not pa.types.is_timestamp(schema.field("timestamp").type):
            return f"column 'timestamp' is {schema.field('timestamp').type}, not a timestamp"
        return columns.problem(schema)

    return problem


def _label_problem(schema: pa.Schema) -> str | None:
    missing = [k for k in ("request_id", "row", "label", "received_at") if k not in schema.names]
    if missing:
        return f"not a labels file: lacks {missing}"
    if not pa.types.is_integer(schema.field("label").type):
        return f"column 'label' is {schema.field('label').type}, not an integer class"
    if not pa.types.is_timestamp(schema.field("received_at").type):
        return f"column 'received_at' is {schema.field('received_at').type}, not a timestamp"
    return None


def _last_per_key(table: pa.Table, order: list[str]) -> pa.Table:
    """One row per (request_id, row): the last by `order` (ascending), keys sorted."""
    return last_per_key(table, KEYS, order).sort_by([(k, "ascending") for k in KEYS])


def _read(files: list[str], read: Callable[[list[str]], pa.Table], skipped: list[dict]) -> tuple[pa.Table, list[str]]:
    """`read(files)`; when that fails (a file whose footer passed but whose data does not read or cast),
    each file alone, the failing ones added to `skipped`. Returns (the table, the files read)."""
    try:
        return read(files), files
    except (OSError, pa.ArrowException):
        pass
    tables, read_ok = [], []
    for path in files:
        try:
            tables.append(read([path]))
            read_ok.append(path)
        except (OSError, pa.ArrowException) as exc:
            skipped.append({"path": path, "rows": None, "reason": f"unreadable rows ({exc})"})
    return (pa.concat_tables(tables) if tables else read([])), read_ok


def _log_reader(root: str, columns: LogColumns, fs: pafs.FileSystem) -> Callable[[list[str]], pa.Table]:
    schema = pa.schema([*_LOG_KEYS.items(), *columns.fields, ("version", pa.int64()), ("date", pa.string())])

    def read(files: list[str]) -> pa.Table:
        if not files:
            return schema.empty_table()
        return ds.dataset(files, format="parquet", partitioning=_HIVE_LOG, partition_base_dir=root,
                          schema=schema, filesystem=fs).to_table()

    return read


def _labels_reader(root: str, all_files: list[str], fs: pafs.FileSystem) -> Callable[[list[str]], pa.Table]:
    """Label rows with `_file`: the file's rank in path order among `all_files` (for ties of received_at)."""
    rank = {path: i for i, path in enumerate(all_files)}

    def read(files: list[str]) -> pa.Table:
        parts = []
        if files:
            dataset = ds.dataset(files, format="parquet", partitioning=_HIVE_LABELS, partition_base_dir=root,
                                 schema=_LABEL_SCHEMA, filesystem=fs)
            for fragment in dataset.get_fragments():
                part = fragment.to_table(schema=_LABEL_SCHEMA)
                parts.append(part.append_column("_file", pa.array(np.full(part.num_rows, rank[fragment.path],
                                                                           np.int64))))
        if not parts:
            return _LABEL_SCHEMA.empty_table().append_column("_file", pa.array([], pa.int64()))
        return pa.concat_tables(parts)

    return read


def _keyed(table: pa.Table) -> pa.Table:
    """The rows whose request_id and row are both set (only those can join)."""
    return table.filter(pc.and_(pc.is_valid(table.column("request_id")), pc.is_valid(table.column("row"))))


def _by_version(table: pa.Table) -> dict:
    if table.num_rows == 0:
        return {}
    grouped = table.group_by("version", use_threads=False).aggregate([
        ("request_id", "count"), ("date", "min"), ("date", "max"), ("timestamp", "min"), ("timestamp", "max")])
    out = {}
    for row in grouped.to_pylist():
        key = "unknown" if row["version"] is None else str(row["version"])
        out[key] = {"rows": row["request_id_count"], "first_date": row["date_min"], "last_date": row["date_max"],
                    "first_prediction": _iso(row["timestamp_min"]), "last_prediction": _iso(row["timestamp_max"])}
    return out


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()


def read_labelled_traffic(root: str | Path, model: str, columns: LogColumns, *, classes: int,
                          window_days: float = DEFAULT_LABEL_WINDOW_DAYS) -> LabelledTraffic:
    """The served model `model`'s logged predictions joined with their labels, and a report of what was used.

    `root` is the data folder (a path or a URI); `columns` the log columns the model trains on; `classes` the number
    of classes (a label outside 0 .. classes - 1 is counted and dropped); `window_days` how far
    apart a prediction and its label may be. Never raises for bad files: they are skipped and reported.
    """
    if not window_days > 0:
        raise ValueError(f"the label window must be > 0 days, got {window_days}")
    location = locate(str(root))
    fs, log_root, label_root = location.fs, location.sub("traffic", model), location.sub("labels", model)
    log_files, log_skipped = _screen(list_files(fs, log_root), _log_problem(columns), fs)
    label_files, label_skipped = _screen(list_files(fs, label_root), _label_problem, fs)
    skipped = log_skipped + label_skipped
    log, log_files = _read(log_files, _log_reader(log_root, columns, fs), skipped)
    labels, label_files = _read(label_files, _labels_reader(label_root, label_files, fs), skipped)
    report: dict = {"model": model, "traffic_dir": location.show(log_root), "labels_dir": location.show(label_root),
                    "columns": columns.describe, "label_window_days": window_days,
                    "traffic_files": log_files, "label_files": label_files, "skipped_files": skipped,
                    "predictions_logged": log.num_rows, "labels_received": labels.num_rows}
    log, labels = _keyed(log), _keyed(labels.filter(pc.is_valid(labels.column("label"))))
    keyed = {"predictions": log.num_rows, "labels": labels.num_rows}
    report["rows_without_key"] = report["predictions_logged"] + report["labels_received"] - sum(keyed.values())
    empty = _empty(columns)
    if log.num_rows == 0 or labels.num_rows == 0:
        report.update(predictions=log.num_rows, labels=labels.num_rows, joined_rows=0,
                      unlabelled_predictions=log.num_rows, labels_without_prediction=labels.num_rows,
                      outside_window=0, invalid_labels=0, by_version={})
        return LabelledTraffic(empty, tuple(log_files), tuple(label_files), report)
    log = _last_per_key(log.append_column("_neg_ts", pc.negate(log.column("timestamp").cast(pa.int64()))),
                        ["_neg_ts"]).drop_columns(["_neg_ts"])  # the first logging of a prediction
    labels = _last_per_key(labels, ["received_at", "_file"])
    indexed = log.append_column("_i", pa.array(np.arange(log.num_rows, dtype=np.int64)))
    matched = indexed.select([*KEYS, "_i"]).join(labels.select([*KEYS, "label", "received_at"]), keys=KEYS,
                                                  join_type="inner", use_threads=False)  # a threaded Acero join segfaulted (pyarrow 26.0.1)
    matched = matched.sort_by("_i")
    joined = log.take(matched.column("_i")).append_column("label", matched.column("label")) \
        .append_column("received_at", matched.column("received_at"))
    apart = pc.abs(pc.subtract(joined.column("received_at"), joined.column("timestamp")))
    within = pc.less_equal(apart, pa.scalar(timedelta(days=window_days), pa.duration("us")))
    valid = pc.and_(pc.greater_equal(joined.column("label"), 0), pc.less(joined.column("label"), classes))
    kept = joined.filter(pc.and_(within, valid))
    report.update(
        predictions=log.num_rows, labels=labels.num_rows, joined_rows=kept.num_rows,
        duplicate_predictions=keyed["predictions"] - log.num_rows,
        relabelled=keyed["labels"] - labels.num_rows,
        unlabelled_predictions=log.num_rows - matched.num_rows,
        labels_without_prediction=labels.num_rows - matched.num_rows,
        outside_window=int(pc.sum(pc.invert(within)).as_py() or 0),
        invalid_labels=int(pc.sum(pc.and_(within, pc.invert(valid))).as_py() or 0),
        by_version=_by_version(kept),
    )
    if kept.num_rows:
        report["first_prediction"] = _iso(pc.min(kept.column("timestamp")).as_py())
        report["last_prediction"] = _iso(pc.max(kept.column("timestamp")).as_py())
    return LabelledTraffic(kept, tuple(log_files), tuple(label_files), report)


def _empty(columns: LogColumns) -> pa.Table:
    return pa.schema([*_LOG_KEYS.items(), *columns.fields, ("version", pa.int64()), ("date", pa.string()),
                      ("label", pa.int64()), ("received_at", pa.timestamp("us", tz="UTC"))]).empty_table()


def decode_images(table: pa.Table, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The uint8 images of a joined table's `<name>` / `<name>_shape` columns, one group per shape.

    Yields (row indices int64 [k], images uint8 [k, h, w]) for each distinct (h, w): pixels are
    sliced out of the Arrow buffer of each group at once, never parsed row by row. Raises
    ValueError naming the first row whose shape is not [h, w] or whose pixel count does not match it.
    """
    shapes = table.column(f"{name}_shape").combine_chunks()
    dims = pc.list_value_length(shapes).fill_null(0).to_numpy(zero_copy_only=False)
    if (dims != 2).any():
        bad = int(np.flatnonzero(dims != 2)[0])
        raise ValueError(f"logged row {bad}: {name}_shape {shapes[bad].as_py()} is not [h, w]")
    hw = pc.list_flatten(shapes).to_numpy(zero_copy_only=False).reshape(-1, 2).astype(np.int64)
    pixels = table.column(name).combine_chunks()
    sizes = pc.binary_length(pixels).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    wrong = sizes != hw[:, 0] * hw[:, 1]
    if wrong.any():
        bad = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"logged row {bad}: {sizes[bad]} pixel bytes for {name}_shape {hw[bad].tolist()}")
    for shape in np.unique(hw, axis=0) if len(hw) else []:
        rows = np.flatnonzero((hw == shape).all(axis=1))
        taken = pixels.take(pa.array(rows))
        offsets = np.frombuffer(taken.buffers()[1], np.int32)[taken.offset : taken.offset + len(taken) + 1]
        data = np.frombuffer(taken.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        yield rows, data.reshape(len(rows), int(shape[0]), int(shape[1]))


def summarize(report: dict) -> list[str]:
    """What a job prints about the traffic it read: one line, plus one per skipped file."""
    model = report.get("model")
    if report.get("included") is False:
        return ["logged traffic left out (--no-traffic)"]
    lines = []
    logged, received = report.get("predictions_logged", 0), report.get("labels_received", 0)
    if not report.get("traffic_files") and not report.get("label_files"):
        lines.append(f"no labelled traffic of {model}: nothing logged under {report.get('traffic_dir')}; "
                     "training on the example data only")
    elif not report.get("label_files") or received == 0:
        lines.append(f"{logged} prediction(s) of {model} logged, but no labels under {report.get('labels_dir')} "
                     f"(POST /v2/models/{model}/feedback sends them): training on the example data only")
    elif not report.get("traffic_files") or logged == 0:
        lines.append(f"{received} label(s) of {model} received, but no usable prediction log under "
                     f"{report.get('traffic_dir')}: training on the example data only")
    else:
        versions = ", ".join(f"version {v}: {e['rows']} rows, {e['first_date']}..{e['last_date']}"
                             for v, e in sorted(report.get("by_version", {}).items()))
        lines.append(
            f"traffic of {model}: {logged} prediction(s) in {len(report['traffic_files'])} file(s), {received} "
            f"label(s) in {len(report['label_files'])} file(s); joined {report.get('joined_rows', 0)} labelled row(s)"
            f"{f' ({versions})' if versions else ''}; {report.get('unlabelled_predictions', 0)} without a label, "
            f"{report.get('labels_without_prediction', 0)} label(s) without a prediction, "
            f"{report.get('outside_window', 0)} outside the {report.get('label_window_days'):g}-day label window, "
            f"{report.get('invalid_labels', 0)} invalid label(s)")
    skipped_files = report.get("skipped_files", [])
    for skipped in skipped_files[:_SHOWN_SKIPS]:
        lines.append(f"  skipped {skipped['path']} ({skipped['rows'] if skipped['rows'] is not None else '?'} "
                     f"rows): {skipped['reason']}")
    if len(skipped_files) > _SHOWN_SKIPS:
        lines.append(f"  ... and {len(skipped_files) - _SHOWN_SKIPS} more skipped file(s) (metadata.json lists them)")
    if report.get("decode_error"):
        lines.append(f"  traffic images not used: {report['decode_error']}")
    return lines
