"""Where a training job's rows come from: the example parquet data plus logged, labelled traffic.

A job runs in Ray's copy of the working dir, where `data/` is left out of the
upload (.rayignore): the data folder is an absolute path, from `--data-dir`,
else `FLEET_DATA_DIR` (set by `fleet up` for its jobs), else `./data`.

    <data>/fraud/*.parquet             example data (`python -m training.datasets fraud`)
    <data>/traffic/fraud/*.parquet     labelled traffic logged by the serving cluster: same columns

Rows are split into train / validation / holdout by a hash of their feature
values, not by position: the same row always lands in the same split, whatever
files are added or in which order they are read. So a retrained candidate and
the version now serving are compared on one holdout that neither trained on
(as long as both were trained by this code).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets import FRAUD_FEATURES, write_fraud_parquet

__all__ = [
    "DATA_ENV", "EXAMPLE_ROWS", "DataSources", "data_dir", "ensure_example_data", "find_sources", "file_fingerprint",
    "split_buckets", "to_training_batch", "read_fraud", "split_fraud", "to_numpy",
]  # fmt: skip

DATA_ENV = "FLEET_DATA_DIR"
EXAMPLE_ROWS = 40_000
HOLDOUT_PERCENT = 20  # buckets 0..19 of 100
VALIDATION_PERCENT = 10  # buckets 20..29: picks the best checkpoint; the rest trains
LABEL = "label"


def data_dir(flag: str | None = None) -> Path:
    """The data folder, absolute: the flag, else FLEET_DATA_DIR, else ./data."""
    return Path(flag or os.environ.get(DATA_ENV) or "data").expanduser().resolve()


def ensure_example_data(root: Path, model: str = "fraud", rows: int = EXAMPLE_ROWS, seed: int = 0) -> Path:
    """The example parquet file of `model` under `root/<model>/`, written (seeded, baseline) if missing."""
    if model != "fraud":
        raise ValueError(f"no example data for model {model!r}; the examples are: fraud")
    path = root / model / f"fraud-baseline-seed{seed}-{rows}.parquet"
    if not path.exists():
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        write_fraud_parquet(str(tmp), rows, seed=seed)
        os.replace(tmp, path)  # a concurrent job sees the whole file or none
    return path


@dataclass(frozen=True)
class DataSources:
    """The parquet files a run reads: example data and logged traffic, each sorted."""

    example: tuple[str, ...]
    traffic: tuple[str, ...]

    @property
    def files(self) -> list[str]:
        return [*self.example, *self.traffic]

    def describe(self) -> dict:
        """Paths, per-file SHA-256 and the fingerprint of them all: what metadata.json records."""
        per_file = {p: file_fingerprint(p) for p in self.files}
        overall = hashlib.sha256("".join(per_file[p] for p in self.files).encode()).hexdigest()
        return {"sha256": overall, "files": per_file, "example_files": len(self.example),
                "traffic_files": len(self.traffic)}


def _parquet_files(folder: Path) -> tuple[str, ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted(str(p) for p in folder.rglob("*.parquet") if p.is_file()))


def find_sources(root: Path, model: str, *, include_traffic: bool = True) -> DataSources:
    """The example files of `model` (written first if the folder holds none) and its logged traffic."""
    example = _parquet_files(root / model)
    if not example:
        ensure_example_data(root, model)
        example = _parquet_files(root / model)
    traffic = _parquet_files(root / "traffic" / model) if include_traffic else ()
    return DataSources(example, traffic)


def file_fingerprint(path: str) -> str:
    """SHA-256 of a file's bytes: the training-data fingerprint is made of these."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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


def to_training_batch(batch: dict) -> dict:
    """A Ray Data batch of parquet columns -> {"features": float32 [n, 30], "label": float32 [n], "bucket": int}."""
    missing = [c for c in [*FRAUD_FEATURES, LABEL] if c not in batch]
    if missing:
        raise ValueError(f"parquet rows lack the columns {missing}; fraud data needs {FRAUD_FEATURES} and {LABEL!r}")
    features = np.stack([np.asarray(batch[c], dtype=np.float32) for c in FRAUD_FEATURES], axis=1)
    labels = np.asarray(batch[LABEL])
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("fraud labels must be 0 or 1")
    return {"features": features, LABEL: labels.astype(np.float32), "bucket": split_buckets(features)}


def read_fraud(sources: DataSources, *, num_cpus: float = 0.25):
    """A Ray Dataset of the sources' rows as training batches (features, label, bucket)."""
    import ray.data

    ds = ray.data.read_parquet(sources.files, columns=[*FRAUD_FEATURES, LABEL], num_cpus=num_cpus)
    return ds.map_batches(to_training_batch, batch_format="numpy", num_cpus=num_cpus)


def split_fraud(ds, *, num_cpus: float = 0.25) -> dict:
    """{"train", "validation", "holdout"} datasets by row bucket (materialized: read once, used by every worker)."""

    def keep(lo: int, hi: int):
        def fn(batch: dict) -> dict:
            mask = (batch["bucket"] >= lo) & (batch["bucket"] < hi)
            return {"features": batch["features"][mask], LABEL: batch[LABEL][mask]}

        return fn

    ds = ds.materialize()
    bounds = {"holdout": (0, HOLDOUT_PERCENT),
              "validation": (HOLDOUT_PERCENT, HOLDOUT_PERCENT + VALIDATION_PERCENT),
              "train": (HOLDOUT_PERCENT + VALIDATION_PERCENT, 100)}
    return {name: ds.map_batches(keep(lo, hi), batch_format="numpy", num_cpus=num_cpus).materialize()
            for name, (lo, hi) in bounds.items()}


def to_numpy(ds) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [n, 30], labels int64 [n]) of a (small enough) dataset, on the driver."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return np.zeros((0, len(FRAUD_FEATURES)), np.float32), np.zeros(0, np.int64)
    x = np.concatenate([p["features"] for p in parts]).astype(np.float32, copy=False)
    y = np.concatenate([p[LABEL] for p in parts]).astype(np.int64)
    return x, y
