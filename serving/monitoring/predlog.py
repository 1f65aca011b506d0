"""The prediction log sink of one ingress replica: a bounded buffer and a writer thread writing Parquet.

    <data>/traffic/<model>/version=<v>/date=<YYYY-MM-DD>/<UTC time>-<replica>-<seq>.parquet   (zstd; floats plain)

Hive-partitioned, so `pyarrow.dataset.dataset(<data>/traffic/<model>, partitioning="hive")`,
Ray Data and DuckDB (`read_parquet('<data>/traffic/fraud/**/*.parquet', hive_partitioning=1)`)
read a model's folder as one table. Columns: `serving.monitoring.logrows`.

The request path calls `append` with whole answered batches (`LogRecord`); it never waits on
the disk. A writer thread takes everything buffered every `flush_rows` rows or `flush_interval_s`
seconds, whichever comes first, builds one table per (model, version, date) and writes it to a
hidden temporary file that is then renamed: a file appears whole or not at all. `<data>` may be
an object store's URI (`serving.storage`): there each file is one object, whole once uploaded.

When the sink stalls (a slow or full disk, a folder that cannot be written) serving goes on:
the buffer holds at most `max_rows` rows and `max_bytes` bytes (rows being written count too);
a batch that does not fit is dropped, counted per model (`fleet_prediction_log_dropped_total`)
and reported once in the log (then once a minute while it goes on). Rows whose write failed
stay buffered and are written again once the sink recovers. `close` (a graceful stop: `fleet
down`, a rolling update, a replica drain) writes every buffered row before it returns; what
cannot be written by then is counted as dropped, never silently lost.

What the log costs is counted per model (`take_counts`, then `fleet_prediction_log_cpu_seconds_total
{model,part}`): `writer`, the writer thread's CPU time (`time.thread_time`) building and writing the
tables, shared among the models of a flush by their rows; `request_path`, the CPU time the request
path spends handing batches over (`VersionObserver` times one batch in 16 and adds 16 times that
with `add_request_path_ns`: an estimate, as reading a thread's CPU clock costs about 0.3 µs).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from serving.monitoring.logrows import BatchRecord, LogRecord, LogSchema, records_of
from serving.storage import join_uri, locate, write_whole

__all__ = ["PredictionLog", "traffic_dir", "column_compression"]

_log = logging.getLogger("fleet.predlog")
# Parquet options: dictionary encoding only where values repeat (the rest would try it, then fall back), and
# column statistics where readers filter or join (pyarrow.dataset, DuckDB push them down). Compression per column
# (`column_compression`): zstd (Arrow's default level, 1) for every column but floating-point values, which are stored
# plain: zstd took a third of the writer's time and saved 6 % of a fraud row's bytes (random mantissas do not
# compress).
_WRITE_OPTIONS = {"use_dictionary": ["model", "answered_by", "key_id", "violations"],
                  "write_statistics": ["request_id", "row", "timestamp"]}
_REPORT_EVERY_S = 60.0
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 30.0


def column_compression(schema: pa.Schema) -> dict[str, str]:
    """Each Parquet leaf column's codec: "none" for floating-point values (a column's, or a list's elements),
    "zstd" for the rest."""
    codecs = {}
    for f in schema:
        t = f.type
        nested = pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)
        value = t.value_type if nested else t
        codecs[f"{f.name}.list.element" if nested else f.name] = "none" if pa.types.is_floating(value) else "zstd"
    return codecs


def traffic_dir(data_dir: str, model: str) -> str:
    """A model's log folder: a path, or a URI (its query kept) when `data_dir` is one."""
    return join_uri(data_dir, "traffic", model)


class PredictionLog:
    """Buffered, bounded, asynchronous Parquet writer of answered batches (one per ingress replica)."""

    def __init__(self, data_dir: str, replica: str, *, flush_rows: int = 10_000, flush_interval_s: float = 5.0,
                 max_rows: int = 200_000, max_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic):
        if flush_rows < 1 or max_rows < 1 or flush_interval_s <= 0 or max_bytes < 1:
            raise ValueError("flush_rows, max_rows and max_bytes must be >= 1 and flush_interval_s > 0")
        self.data_dir = data_dir
        self.replica = replica
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._clock = clock
        location = locate(data_dir)
        self._fs, self._root = location.fs, location.path
        self._schemas: dict[tuple[str, int], LogSchema] = {}
        self._compression: dict = {}  # Arrow schema -> its columns' codecs
        self._pending: collections.deque[LogRecord] = collections.deque()
        self._rows = 0  # buffered rows, those being written included
        self._bytes = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # `append` takes the lock itself: one Python call fewer
        self._closing = False
        self._flush_now = False
        self._seq = 0
        self._written: dict[str, int] = collections.Counter()  # since the last take_counts()
        self._dropped: dict[str, int] = collections.Counter()
        self._writer_ns: dict[str, int] = collections.Counter()  # the writer thread's CPU time, since take_counts()
        self._path_ns: dict[str, int] = collections.Counter()  # the request path's hand-over time (its own thread)
        self.written_total: dict[str, int] = collections.Counter()
        self.dropped_total: dict[str, int] = collections.Counter()
        self._last_report: dict[str, float] = {}
        self._last_error: str | None = None
        self._retry_s = _RETRY_MIN_S
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()  # turns a BatchRecord's times into unix
        self._thread = threading.Thread(target=self._run, name=f"fleet-predlog-{replica}", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------
    def register(self, model: str, version: int, schema: LogSchema) -> None:
        """The schema the writer builds `model`/`version`'s tables with."""
        self._schemas[(model, version)] = schema

    def append(self, record: LogRecord | BatchRecord) -> bool:
        """Buffer one answered batch; False when it did not fit (its rows are counted as dropped)."""
        with self._lock:
            if self._closing or self._rows + record.rows > self.max_rows or self._bytes + record.nbytes > self.max_bytes:
                self._drop(record.model, record.rows, "closed" if self._closing else "buffer full")
                return False
            self._pending.append(record)
            self._rows += record.rows
            self._bytes += record.nbytes
            if self._rows >= self.flush_rows:
                self._cond.notify()
        return True

    @property
    def buffered_rows(self) -> int:
        return self._rows

    def add_request_path_ns(self, model: str, ns: int) -> None:
        """Time the request path spent handing `model`'s rows over (called from the event loop's thread only)."""
        self._path_ns[model] += ns

    def take_counts(self) -> dict[str, dict[str, int]]:
        """{model: {"written": rows, "dropped": rows, "writer_ns": ns, "request_path_ns": ns}} since the last call
        (the monitor adds them up). Call it from the thread that calls `add_request_path_ns`."""
        path, self._path_ns = self._path_ns, collections.Counter()
        with self._cond:
            models = set(self._written) | set(self._dropped) | set(self._writer_ns) | set(path)
            out = {m: {"written": self._written.get(m, 0), "dropped": self._dropped.get(m, 0),
                       "writer_ns": self._writer_ns.get(m, 0), "request_path_ns": path.get(m, 0)} for m in models}
            self._written.clear()
            self._dropped.clear()
            self._writer_ns.clear()
        return out

    def give_back_counts(self, counts: dict[str, dict[str, int]]) -> None:
        """Counts taken for a hand-off that failed: they go out with the next ones."""
        with self._cond:
            for model, entry in counts.items():
                self._written[model] += entry.get("written", 0)
                self._dropped[model] += entry.get("dropped", 0)
                self._writer_ns[model] += entry.get("writer_ns", 0)
        for model, entry in counts.items():
            self._path_ns[model] += entry.get("request_path_ns", 0)

    def _drop(self, model: str, rows: int, why: str) -> None:  # under the lock
        self._dropped[model] += rows
        self.dropped_total[model] += rows
        now = self._clock()
        last = self._last_report.get(model)
        if last is None or now - last >= _REPORT_EVERY_S:
            self._last_report[model] = now
            _log.warning("prediction log of model %s: %s (%d of %d rows, %d bytes buffered); dropped %d rows so "
                         "far%s", model, why, self._rows, self.max_rows, self._bytes, self.dropped_total[model],
                         f"; the sink fails: {self._last_error}" if self._last_error else "")

    # -- the writer thread -----------------------------------------------------------
    def _run(self) -> None:
        next_flush = self._clock() + self.flush_interval_s
        while True:
            with self._cond:
                while not (self._closing or self._flush_now) and self._rows < self.flush_rows \
                        and self._clock() < next_flush:
                    self._cond.wait(timeout=max(0.0, next_flush - self._clock()))
                closing = self._closing
                self._flush_now = False
                batch, self._pending = self._pending, collections.deque()  # no copy of what was buffered
            failed = self._timed_write(batch) if batch else []
            with self._cond:
                for record in reversed(failed):  # the oldest first again
                    self._pending.appendleft(record)
                self._cond.notify_all()  # flush() waits for an empty buffer
                if closing and (not self._pending or failed):
                    return
            if failed:
                with self._cond:  # close() wakes it
                    self._cond.wait(timeout=self._retry_s)
                self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)
                next_flush = self._clock()
            else:
                self._retry_s = _RETRY_MIN_S
                next_flush = self._clock() + self.flush_interval_s

    def _timed_write(self, records) -> list:
        """`_write`, its CPU time counted per model (shared by rows)."""
        start = time.thread_time_ns()
        failed = self._write(records)
        spent = time.thread_time_ns() - start
        rows: dict[str, int] = collections.Counter()
        for r in records:
            rows[r.model] += r.rows
        total = sum(rows.values())
        with self._cond:
            for model, n in rows.items():
                self._writer_ns[model] += spent * n // total if total else 0
        return failed

    def _write(self, records: list[LogRecord]) -> list[LogRecord]:
        """Write the records, one file per (model, version, date); return those that failed."""
        groups: dict[tuple[str, int, str], list[LogRecord]] = {}
        raw = [r for r in records if isinstance(r, BatchRecord)]  # the request path's form: columns derived here
        if raw:  # records that failed before (already LogRecords) are the older ones: they stay first
            records = [r for r in records if not isinstance(r, BatchRecord)] + records_of(raw, self._wall_offset_ns)
        for r in records:
            groups.setdefault((r.model, r.version, r.date), []).append(r)
        failed: list[LogRecord] = []
        for (model, version, date), group in groups.items():
            try:
                self._write_group(model, version, date, group)
            except Exception as exc:  # noqa: BLE001 - the sink failing must not stop the writer
                failed.extend(group)
                error = f"{type(exc).__name__}: {exc}"
                if error != self._last_error:
                    _log.error("prediction log of model %s: writing %d rows failed (%s); they stay buffered and "
                               "are written again when the sink recovers", model, sum(r.rows for r in group), error)
                self._last_error = error
                continue
            rows, size = sum(r.rows for r in group), sum(r.nbytes for r in group)
            with self._cond:
                self._rows -= rows
                self._bytes -= size
                self._written[model] += rows
                self.written_total[model] += rows
            if self._last_error is not None:
                _log.warning("prediction log of model %s: the sink writes again", model)
                self._last_error = None
        return failed

    def _write_group(self, model: str, version: int, date: str, group: list[LogRecord]) -> None:
        schema = self._schemas[(model, version)]
        table = schema.table(group)
        folder = f"{self._root.rstrip('/')}/traffic/{model}/version={version}/date={date}"
        self._seq += 1
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{self.replica}-{self._seq:06d}.parquet"
        compression = self._compression.get(table.schema)
        if compression is None:
            compression = self._compression[table.schema] = column_compression(table.schema)
        write_whole(self._fs, f"{folder}/{name}", lambda target: pq.write_table(
            table, target, filesystem=self._fs, compression=compression, **_WRITE_OPTIONS))

    # -- stopping ---------------------------------------------------------------------
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Write everything buffered now; True when the buffer emptied within `timeout_s`."""
        deadline = self._clock() + timeout_s
        with self._cond:
            while self._rows > 0 and self._clock() < deadline:
                self._flush_now = True  # the writer waits for flush_rows or its interval otherwise
                self._cond.notify_all()
                self._cond.wait(timeout=0.05)
            return self._rows == 0

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking rows and write every buffered one (waiting at most `timeout_s`); count what is left."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
            for record in left:
                self._drop(record.model, record.rows, "stopping with the sink failing")
                self._rows -= record.rows
                self._bytes -= record.nbytes
