"""Logged traffic and labels as the serving cluster writes them, for the training tests.

The prediction log is written by the serving side's own writer (`serving.monitoring.predlog.
PredictionLog` with `logrows.LogSchema`, the code the ingress replicas run), so the training
job is tested against the files it will really read. Labels are written in the layout of the
feedback route: `<data>/labels/<model>/date=<YYYY-MM-DD>/<name>.parquet` with `request_id`,
`row` (int32), `label` (int64) and `received_at` (timestamp[us, UTC]).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.model_config import spec_from_config
from serving.monitoring.logrows import LogRecord, LogSchema
from serving.monitoring.predlog import PredictionLog
from training.bootstrap import fraud_config
from training.datasets import FRAUD_FEATURES
from training.digits import digits_config

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def _write(data_dir: Path, model: str, version: int, schema: LogSchema, record: LogRecord) -> None:
    # A replica name per batch: the writer names files by second, replica and sequence number.
    log = PredictionLog(str(data_dir), f"test-{record.request_ids[0]}", flush_rows=1_000_000, flush_interval_s=60.0)
    log.register(model, version, schema)
    assert log.append(record)
    log.close()
    assert log.dropped_total.get(model, 0) == 0


def log_fraud(data_dir: Path, model: str, x: np.ndarray, *, version: int = 1, at: datetime = T0,
              prefix: str = "r", redact: str | None = None) -> list[str]:
    """Log one answered batch of fraud rows (one request per row); returns the request ids."""
    config = fraud_config()
    config.name = model
    if redact:
        config.parameters["fleet.log.redact"].string_value = redact
    schema = LogSchema(spec_from_config(config), {"feature_names": list(FRAUD_FEATURES)})
    n = len(x)
    ids = [f"{prefix}-{i}" for i in range(n)]
    arrival = _us(at) + np.arange(n, dtype=np.int64) * 1000
    record = LogRecord(model=model, version=version, date=at.strftime("%Y-%m-%d"), rows=n, request_ids=ids,
                       request_rows=None, arrival_us=arrival, latency_us=np.full(n, 900, np.int64),
                       queue_us=np.full(n, 100, np.int64), compute_us=500, answered_by="model", key_ids=None,
                       inputs={"features": np.ascontiguousarray(x, np.float32)},
                       outputs={"probability": np.full((n, 1), 0.01, np.float32)})
    _write(data_dir, model, version, schema, record)
    return ids


def log_digits(data_dir: Path, model: str, images: list[np.ndarray], *, version: int = 1, at: datetime = T0,
               prefix: str = "d", full: bool = True) -> list[str]:
    """Log one answered batch of digits images of any sizes (in full unless not `full`); returns the request ids."""
    config = digits_config()
    config.name = model
    if full:
        config.parameters["fleet.log.inputs"].string_value = "full"
    schema = LogSchema(spec_from_config(config), None, image_inputs=("image",))
    n = len(images)
    ids = [f"{prefix}-{i}" for i in range(n)]
    record = LogRecord(model=model, version=version, date=at.strftime("%Y-%m-%d"), rows=n, request_ids=ids,
                       request_rows=None, arrival_us=_us(at) + np.arange(n, dtype=np.int64) * 1000,
                       latency_us=np.full(n, 900, np.int64), queue_us=np.full(n, 100, np.int64), compute_us=500,
                       answered_by="model", key_ids=None, inputs={"image": list(images)},
                       outputs={"probabilities": np.full((n, 10), 0.1, np.float32)})
    _write(data_dir, model, version, schema, record)
    return ids


def write_labels(data_dir: Path, model: str, request_ids: list[str], labels, *, at: datetime = T0 + timedelta(hours=1),
                 rows=None, name: str = "labels-0001") -> Path:
    """One labels file as the feedback route writes it; `at` is every label's received_at."""
    n = len(request_ids)
    table = pa.table({
        "request_id": pa.array(request_ids, pa.string()),
        "row": pa.array(np.zeros(n, np.int32) if rows is None else np.asarray(rows, np.int32)),
        "label": pa.array(np.asarray(labels, np.int64)),
        "received_at": pa.array(np.full(n, _us(at), np.int64), pa.timestamp("us", tz="UTC")),
    })
    folder = data_dir / "labels" / model / f"date={at.strftime('%Y-%m-%d')}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.parquet"
    pq.write_table(table, path, compression="zstd")
    return path
