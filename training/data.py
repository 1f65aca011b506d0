"""Where a fraud training job's rows come from: the example parquet data plus logged traffic joined with its labels.

A job runs in Ray's copy of the working dir, where `data/` is left out of the
upload (.rayignore): the data folder is an absolute path, from `--data-dir`,
else `FLEET_DATA_DIR` (set by `fleet up` for its jobs), else `./data`; or a
URI (`s3://bucket/data?region=...`, `serving.storage`), every file then listed,
read and written through its pyarrow filesystem (`DataSources.filesystem`).

    <data>/fraud/*.parquet                       example data (`python -m training.datasets fraud`):
                                                 the 30 feature columns and "label"
    <data>/traffic/<served model>/version=<v>/date=<d>/*.parquet   the prediction log
    <data>/labels/<served model>/date=<d>/*.parquet                its labels (training.traffic joins them)

Rows are split into train / validation / holdout by a hash of their feature
values, not by position: the same row always lands in the same split, whatever
files are added or in which order they are read. So a retrained candidate and
the version now serving are compared on one holdout that neither trained on
(as long as both were trained by this code). Traffic rows are split by the
same hash; each batch says which rows came from traffic ("traffic": 1.0), so
the gate can score the traffic holdout apart and the loss can weight them
(`source_weights`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serving.storage import is_uri, list_files, locate, write_whole
from training.datasets import FRAUD_FEATURES, write_fraud_parquet
from training.traffic import DEFAULT_LABEL_WINDOW_DAYS, LabelledTraffic, feature_columns, read_labelled_traffic

__all__ = [
    "DATA_ENV", "EXAMPLE_ROWS", "HOLDOUT_PERCENT", "VALIDATION_PERCENT", "DEFAULT_TRAFFIC_SHARE", "DataSources",
    "data_dir", "ensure_example_data", "example_files", "check_example_files", "find_sources", "file_fingerprint", "split_buckets", "source_weights",
    "to_training_batch", "fraud_traffic", "newest_rows", "read_fraud", "split_fraud", "to_numpy", "SplitRows",
]  # fmt: skip

DATA_ENV = "FLEET_DATA_DIR"
EXAMPLE_ROWS = 40_000
HOLDOUT_PERCENT = 20  # buckets 0..19 of 100
VALIDATION_PERCENT = 10  # buckets 20..29: picks the best checkpoint; the rest trains
DEFAULT_TRAFFIC_SHARE = 0.5  # labelled traffic carries at least half of the training loss when there is any
LABEL = "label"
TRAFFIC = "traffic"  # 1.0 for a row from logged traffic, 0.0 for an example row


def data_dir(flag: str | None = None) -> str:
    """The data folder: the flag, else FLEET_DATA_DIR, else ./data; a local one made absolute, a URI as it is."""
    root = flag or os.environ.get(DATA_ENV) or "data"
    return root if is_uri(root) else str(Path(root).expanduser().resolve())


def ensure_example_data(root: str | Path, model: str = "fraud", rows: int = EXAMPLE_ROWS, seed: int = 0) -> str:
    """The example parquet file of `model` under `root/<model>/` (its path in root's filesystem), written (seeded,
    baseline) if missing."""
    if model != "fraud":
        raise ValueError(f"no example data for model {model!r}; the examples are: fraud")
    location = locate(str(root))
    path = location.sub(model, f"fraud-baseline-seed{seed}-{rows}.parquet")
    if location.fs.get_file_info(path).type == pafs.FileType.NotFound:
        # A concurrent job sees the whole file or none.
        write_whole(location.fs, path, lambda target: write_fraud_parquet(target, rows, seed=seed,
                                                                          filesystem=location.fs))
    return path


@dataclass(frozen=True)
class DataSources:
    """The parquet files a run reads: example data, and the prediction log and label files it joined, each sorted.

    The paths are in `filesystem` (the data folder's; None: the local one)."""

    example: tuple[str, ...]
    traffic: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    filesystem: pafs.FileSystem | None = None

    @property
    def files(self) -> list[str]:
        return [*self.example, *self.traffic, *self.labels]

    def describe(self) -> dict:
        """Paths, per-file SHA-256 and the fingerprint of them all: what metadata.json records."""
        per_file = {p: file_fingerprint(p, self.filesystem) for p in self.files}
        overall = hashlib.sha256("".join(per_file[p] for p in self.files).encode()).hexdigest()
        return {"sha256": overall, "files": per_file, "example_files": len(self.example),
                "traffic_files": len(self.traffic), "label_files": len(self.labels)}


def example_files(root: str | Path, model: str = "fraud") -> tuple[str, ...]:
    """The example files of `model` under `root/<model>/` (the seeded example written first if there is none)."""
    location = locate(str(root))
    files = tuple(list_files(location.fs, location.sub(model)))
    if not files:
        ensure_example_data(root, model)
        files = tuple(list_files(location.fs, location.sub(model)))
    return files


def check_example_files(files: tuple[str, ...], columns: list[str], filesystem: pafs.FileSystem | None = None) -> None:
    """SystemExit naming the first example file that cannot be read or lacks one of `columns` (footers only)."""
    for path in files:
        try:
            names = pq.read_schema(path, filesystem=filesystem).names
        except (OSError, pa.ArrowException) as exc:
            raise SystemExit(f"example data {path}: not a readable parquet file ({exc})") from exc
        missing = [c for c in columns if c not in names]
        if missing:
            raise SystemExit(f"example data {path} lacks the columns {missing}; it needs {columns} "
                             f"(python -m training.datasets writes such files)")


def find_sources(root: str | Path, model: str, traffic: LabelledTraffic | None = None) -> DataSources:
    """The example files of `model` and, when given, the log and label files `traffic` was joined from."""
    files = example_files(root, model)
    fs = locate(str(root)).fs
    if traffic is None:
        return DataSources(files, filesystem=fs)
    return DataSources(files, traffic.traffic_files, traffic.label_files, filesystem=fs)


def file_fingerprint(path: str, filesystem: pafs.FileSystem | None = None) -> str:
    """SHA-256 of a file's bytes: the training-data fingerprint is made of these."""
    digest = hashlib.sha256()
    with (filesystem or pafs.LocalFileSystem()).open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_buckets(features: np.ndarray) -> np.ndarray:
    """A bucket 0..99 per row from its float32 feature bytes (FNV-1a over 32-bit words), stable across reads."""
    words = np.ascontiguousarray(features, dtype=np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(len(words), 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * prime
        h ^= h >> np.uint64(29)
    return (h % np.uint64(100)).astype(np.int64)


def source_weights(example_rows: int, traffic_rows: int, share: float = DEFAULT_TRAFFIC_SHARE) -> tuple[float, float]:
    """(weight of an example row, weight of a traffic row) in the training loss.

    Traffic rows carry at least `share` (0..1) of the total weight: when they are fewer than
    that, each weighs `share * n / traffic_rows` and each example row `(1 - share) * n /
    example_rows` (n all rows, so the mean weight stays 1); otherwise, or when either source
    is empty, every row weighs 1. After a drift the example data is stale, so the little
    labelled traffic there is must not drown in it.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the traffic share must lie in [0, 1], got {share}")
    total = example_rows + traffic_rows
    if example_rows == 0 or traffic_rows == 0 or traffic_rows >= share * total:
        return 1.0, 1.0
    return (1.0 - share) * total / example_rows, share * total / traffic_rows


def to_training_batch(batch: dict, traffic: bool = False) -> dict:
    """Parquet columns -> {"features": float32 [n, 30], "label": float32 [n], "bucket": int, "traffic": float32 [n]}."""
    missing = [c for c in [*FRAUD_FEATURES, LABEL] if c not in batch]
    if missing:
        raise ValueError(f"parquet rows lack the columns {missing}; fraud data needs {FRAUD_FEATURES} and {LABEL!r}")
    features = np.stack([np.asarray(batch[c], dtype=np.float32) for c in FRAUD_FEATURES], axis=1)
    labels = np.asarray(batch[LABEL])
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("fraud labels must be 0 or 1")
    return {"features": features, LABEL: labels.astype(np.float32), "bucket": split_buckets(features),
            TRAFFIC: np.full(len(labels), 1.0 if traffic else 0.0, np.float32)}


def fraud_traffic(root: str | Path, served: str, *, window_days: float = DEFAULT_LABEL_WINDOW_DAYS,
                  ) -> tuple[LabelledTraffic, np.ndarray, np.ndarray]:
    """The served model's labelled traffic: (the join and its report, features float32 [n, 30], labels int64 [n]).

    Rows with a NaN or infinite feature are dropped (counted in the report as `non_finite_rows`).
    """
    joined = read_labelled_traffic(root, served, feature_columns(FRAUD_FEATURES), classes=2, window_days=window_days)
    table = joined.table
    x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in FRAUD_FEATURES], axis=1) \
        .astype(np.float32, copy=False) if table.num_rows else np.zeros((0, len(FRAUD_FEATURES)), np.float32)
    y = table.column(LABEL).to_numpy(zero_copy_only=False).astype(np.int64) if table.num_rows else np.zeros(0, np.int64)
    finite = np.isfinite(x).all(axis=1)
    joined.report["non_finite_rows"] = int((~finite).sum())
    if table.num_rows:
        joined.stamps = table.column("timestamp").cast("int64").to_numpy(zero_copy_only=False)[finite]
    return joined, x[finite], y[finite]


def newest_rows(joined: LabelledTraffic, x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` most recent of `fraud_traffic`'s rows, by the time of their prediction."""
    if joined.stamps is None or len(joined.stamps) != len(y):
        return x[-n:], y[-n:]
    order = np.argsort(joined.stamps, kind="stable")[-n:]
    return x[order], y[order]


def _traffic_table(x: np.ndarray, y: np.ndarray) -> pa.Table:
    return pa.table({**{c: pa.array(x[:, i]) for i, c in enumerate(FRAUD_FEATURES)}, LABEL: pa.array(y)})


def read_fraud(sources: DataSources, traffic: tuple[np.ndarray, np.ndarray] | None = None, *,
               num_cpus: float = 0.25):
    """A Ray Dataset of the example files' rows and the joined traffic rows (x, y) as training batches."""
    import ray.data

    ds = ray.data.read_parquet(list(sources.example), columns=[*FRAUD_FEATURES, LABEL], num_cpus=num_cpus,
                               filesystem=sources.filesystem)
    ds = ds.map_batches(to_training_batch, batch_format="numpy", num_cpus=num_cpus)
    if traffic is not None and len(traffic[1]):
        logged = ray.data.from_arrow(_traffic_table(*traffic))
        ds = ds.union(logged.map_batches(to_training_batch, fn_kwargs={"traffic": True}, batch_format="numpy",
                                         num_cpus=num_cpus))
    return ds


def split_fraud(ds, *, num_cpus: float = 0.25) -> dict:
    """{"train", "validation", "holdout"} datasets by row bucket (materialized: read once, used by every worker)."""

    def keep(lo: int, hi: int):
        def fn(batch: dict) -> dict:
            mask = (batch["bucket"] >= lo) & (batch["bucket"] < hi)
            return {"features": batch["features"][mask], LABEL: batch[LABEL][mask], TRAFFIC: batch[TRAFFIC][mask]}

        return fn

    ds = ds.materialize()
    bounds = {"holdout": (0, HOLDOUT_PERCENT),
              "validation": (HOLDOUT_PERCENT, HOLDOUT_PERCENT + VALIDATION_PERCENT),
              "train": (HOLDOUT_PERCENT + VALIDATION_PERCENT, 100)}
    return {name: ds.map_batches(keep(lo, hi), batch_format="numpy", num_cpus=num_cpus).materialize()
            for name, (lo, hi) in bounds.items()}


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split on the driver: features float32 [n, 30], labels int64 [n], from traffic bool [n]."""

    x: np.ndarray
    y: np.ndarray
    traffic: np.ndarray

    def part(self, from_traffic: bool) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the traffic rows, or of the example rows."""
        mask = self.traffic if from_traffic else ~self.traffic
        return self.x[mask], self.y[mask]


def to_numpy(ds) -> SplitRows:
    """The rows of a (small enough) dataset, on the driver."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return SplitRows(np.zeros((0, len(FRAUD_FEATURES)), np.float32), np.zeros(0, np.int64), np.zeros(0, bool))
    x = np.concatenate([p["features"] for p in parts]).astype(np.float32, copy=False)
    y = np.concatenate([p[LABEL] for p in parts]).astype(np.int64)
    return SplitRows(x, y, np.concatenate([p[TRAFFIC] for p in parts]) > 0.5)
