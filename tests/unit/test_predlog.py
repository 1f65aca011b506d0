"""The prediction log sink: whole files in hive partitions, flushed by rows or time, bounded with counted drops,
every buffered row written on close or counted."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from serving.model_config import TensorSpec
from serving.monitoring.logrows import LogRecord, LogSchema
from serving.monitoring.predlog import PredictionLog


class Spec:
    name = "m"
    parameters: dict = {}
    inputs = (TensorSpec("features", "FP32", (3,)),)
    outputs = (TensorSpec("probability", "FP32", (1,)),)


def record(n: int, tag: str, version: int = 1, date: str = "2026-12-05", model: str = "m") -> LogRecord:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return LogRecord(model=model, version=version, date=date, rows=n, request_ids=[f"{tag}-{i}" for i in range(n)],
                     request_rows=None, arrival_us=np.full(n, 1_700_000_000_000_000, np.int64),
                     latency_us=np.full(n, 900, np.int64), queue_us=np.full(n, 100, np.int64), compute_us=500,
                     answered_by="model", key_ids=None, inputs={"features": x},
                     outputs={"probability": np.full((n, 1), 0.25, np.float32)})


def make_log(tmp_path: Path, **kw) -> PredictionLog:
    log = PredictionLog(str(tmp_path), "r1", **kw)
    log.register("m", 1, LogSchema(Spec, {"feature_names": ["a", "b", "c"]}))
    log.register("m", 2, LogSchema(Spec, {"feature_names": ["a", "b", "c"]}))
    log.register("n", 1, LogSchema(Spec, {"feature_names": ["a", "b", "c"]}))
    return log


def files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "traffic").rglob("*")) if (tmp_path / "traffic").exists() else []


def test_rows_land_in_hive_partitions_as_whole_files_read_back_as_one_table(tmp_path):
    log = make_log(tmp_path, flush_rows=10, flush_interval_s=60)
    assert log.append(record(6, "a")) and log.append(record(6, "b", version=2))
    assert log.flush(10)
    parquet = [p for p in files(tmp_path) if p.is_file()]
    assert {p.relative_to(tmp_path / "traffic").parts[:3] for p in parquet} == {
        ("m", "version=1", "date=2026-12-05"), ("m", "version=2", "date=2026-12-05")}
    assert all(p.suffix == ".parquet" and not p.name.startswith(".") and "-r1-" in p.name for p in parquet)
    table = ds.dataset(tmp_path / "traffic" / "m", partitioning="hive").to_table()
    assert table.num_rows == 12 and sorted(set(table["version"].to_pylist())) == [1, 2]
    rows = dict(zip(zip(table["request_id"].to_pylist(), table["version"].to_pylist()), table["b"].to_pylist()))
    assert rows[("a-1", 1)] == 4.0 and rows[("b-5", 2)] == 16.0  # each row's features, as appended
    assert _rows(log.take_counts()) == {"m": {"written": 12, "dropped": 0}} and log.take_counts() == {}
    log.close()


def test_floating_point_columns_are_stored_plain_and_every_other_column_zstd(tmp_path):
    import pyarrow.parquet as pq

    log = make_log(tmp_path, flush_rows=10, flush_interval_s=60)
    assert log.append(record(4, "a")) and log.flush(10)
    log.close()
    (path,) = [p for p in files(tmp_path) if p.is_file()]
    group = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    plain = {"a", "b", "c", "probability"}
    assert {c for c, codec in codecs.items() if codec == "UNCOMPRESSED"} == plain
    assert {codec for c, codec in codecs.items() if c not in plain} == {"ZSTD"} and "request_id" in codecs


def test_list_columns_are_named_by_their_leaf_path():
    import pyarrow as pa

    from serving.monitoring.predlog import column_compression

    schema = pa.schema([("x", pa.list_(pa.float32(), 3)), ("shape", pa.list_(pa.int32())), ("h", pa.uint64()),
                        ("d", pa.float64())])
    assert column_compression(schema) == {"x.list.element": "none", "shape.list.element": "zstd", "h": "zstd",
                                          "d": "none"}


def test_a_file_is_written_every_flush_rows_or_every_interval(tmp_path):
    log = make_log(tmp_path, flush_rows=100, flush_interval_s=0.3)
    log.append(record(5, "a"))
    time.sleep(0.1)
    assert not files(tmp_path)  # under flush_rows and before the interval: nothing yet
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(p.is_file() for p in files(tmp_path)):
        time.sleep(0.02)
    assert any(p.is_file() for p in files(tmp_path))  # the interval wrote it
    log.close()
    log = make_log(tmp_path / "b", flush_rows=10, flush_interval_s=60)
    log.append(record(12, "c"))  # over flush_rows: written now, not in 60 s
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and log.buffered_rows:
        time.sleep(0.02)
    assert log.buffered_rows == 0
    log.close()


def test_a_stalled_sink_bounds_the_buffer_counts_drops_and_writes_everything_once_it_recovers(tmp_path):
    (tmp_path / "traffic").mkdir()
    blocker = tmp_path / "traffic" / "m"
    blocker.write_text("a file where the model's folder should be")
    log = make_log(tmp_path, flush_rows=10, flush_interval_s=0.05, max_rows=50)
    accepted = sum(log.append(record(10, f"r{i}")) for i in range(20))
    assert accepted == 5  # 50 rows held, the other 150 dropped
    assert log.buffered_rows == 50
    counts = log.take_counts()
    assert _rows(counts) == {"m": {"written": 0, "dropped": 150}}
    blocker.unlink()
    deadline = time.monotonic() + 10  # the writer retries with a growing pause (from 0.5 s)
    while time.monotonic() < deadline and log.buffered_rows:
        time.sleep(0.05)
    assert log.buffered_rows == 0
    table = ds.dataset(tmp_path / "traffic" / "m", partitioning="hive").to_table()
    assert table.num_rows == 50 and _rows(log.take_counts()) == {"m": {"written": 50, "dropped": 0}}
    log.close()


def test_close_writes_every_buffered_row_and_counts_what_it_cannot(tmp_path):
    log = make_log(tmp_path, flush_rows=1000, flush_interval_s=60)
    for i in range(7):
        log.append(record(3, f"c{i}"))
    log.close(timeout_s=10)
    assert ds.dataset(tmp_path / "traffic" / "m", partitioning="hive").count_rows() == 21
    assert not log.append(record(1, "late"))  # closed: dropped and counted, never silently
    assert log.dropped_total["m"] == 1

    (tmp_path / "x" / "traffic").mkdir(parents=True)
    (tmp_path / "x" / "traffic" / "m").write_text("blocked")
    stuck = make_log(tmp_path / "x", flush_rows=1000, flush_interval_s=60)
    stuck.append(record(4, "s"))
    stuck.close(timeout_s=3)
    assert stuck.dropped_total["m"] == 4 and stuck.buffered_rows == 0


def test_counts_handed_back_after_a_failed_push_go_out_with_the_next(tmp_path):
    log = make_log(tmp_path, flush_rows=1, flush_interval_s=60)
    log.append(record(2, "a"))
    assert log.flush(5)
    log.add_request_path_ns("m", 700)
    counts = log.take_counts()
    log.give_back_counts(counts)
    assert log.take_counts() == counts and _rows(counts) == {"m": {"written": 2, "dropped": 0}}
    assert counts["m"]["request_path_ns"] == 700 and counts["m"]["writer_ns"] > 0
    log.close()


def test_the_writers_cpu_time_is_counted_per_model_by_rows(tmp_path):
    log = make_log(tmp_path, flush_rows=10_000, flush_interval_s=60)
    log.append(record(300, "a"))
    log.append(record(100, "b", model="n"))
    assert log.flush(10)
    counts = log.take_counts()
    writer = {m: counts[m]["writer_ns"] for m in ("m", "n")}
    assert writer["m"] > 0 and writer["n"] > 0
    assert 2.9 <= writer["m"] / writer["n"] <= 3.1  # one flush's CPU time, shared 300 : 100 rows
    assert log.take_counts() == {}  # taken once
    log.close()


def _rows(counts: dict) -> dict:
    """take_counts() without the CPU times."""
    return {m: {k: c[k] for k in ("written", "dropped")} for m, c in counts.items()}


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        PredictionLog("/tmp", "r", flush_rows=0)


def test_the_request_paths_hand_over_is_timed_on_one_batch_in_16_and_scaled(tmp_path):
    import asyncio

    from serving.batch_exec import _Pending
    from serving.monitoring.observe import VersionObserver, request_meta

    class Log:
        def __init__(self):
            self.records, self.times = [], []

        def append(self, record):
            self.records.append(record)
            return True

        def add_request_path_ns(self, model, ns):
            self.times.append((model, ns))

    loop = asyncio.new_event_loop()
    log = Log()
    observer = VersionObserver("m", 1, None, None, log, fixed_rows=True)
    for i in range(40):
        batch = []
        for k in range(3):
            future = loop.create_future()
            future.set_result(None)
            batch.append(_Pending({"features": np.full((1, 3), k, np.float32)}, 1, None, future, 0, 0,
                                  meta=request_meta(f"r{i}-{k}", 0)))
        observer(batch, {}, {"probability": np.zeros((3, 1), np.float32)}, 0, 0)
    loop.close()
    assert len(log.records) == 40 and [r.rows for r in log.records[:1]] == [3]
    assert [m for m, _ in log.times] == ["m", "m"]  # batches 16 and 32
    assert all(ns > 0 and ns % 16 == 0 for _, ns in log.times)  # 16 x the timed batch's CPU time
    record = log.records[0]
    assert record.nbytes == 3 * 12 + 3 * (96 + 112)  # from the row size: 3 float32 a row
    np.testing.assert_array_equal(np.concatenate(record.inputs["features"])[:, 0], [0, 1, 2])
