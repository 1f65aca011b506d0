"""Labels joined to their predictions, incrementally, by (request_id, row): the monitor's side.

Each `scan` reads the prediction-log files and label files written since the last one (files
appear whole: the writers rename them into place, or upload each as one object) and joins with
pyarrow's hash join, never a Python loop over rows:

- new labels (duplicates within them and with pending ones resolved: the latest `received_at`
  wins) join every prediction held in memory;
- labels still waiting join the new predictions (a label may come before its prediction);
- predictions are held in memory up to `max_predictions` rows (the oldest leave first); a label
  whose prediction has left memory is found on disk by a filtered dataset scan of the log's
  date partitions within the label window (at most every `disk_interval_s`);
- a label with no prediction after `label_window_days` is dropped and counted (`unmatched`).

What a scan returns are the joined rows: version, the prediction's time and outputs, the label.

The data folder may be an object store's URI (`serving.storage`): there listing the folders
costs requests (one per 1,000 files), so new files are looked for at most every
`list_interval_s` (default 10 s there, every scan on a local disk).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serving.storage import list_files, locate

__all__ = ["ModelJoin", "JoinCounts", "last_per_key", "REMOTE_LIST_INTERVAL_S"]

_log = logging.getLogger("fleet.join")
_KEYS = ["request_id", "row"]
_PARTITIONS = pa.schema([("version", pa.int32()), ("date", pa.string())])
REMOTE_LIST_INTERVAL_S = 10.0  # an object store: folders are listed for new files at most this often


@dataclass
class JoinCounts:
    labels: int = 0  # labels read
    duplicates: int = 0  # labels of a (request_id, row) already labelled: the later won
    joined: int = 0
    unmatched: int = 0  # expired without a prediction
    pending: int = 0  # waiting for their prediction now
    relabelled: int = 0  # a later label for an already joined prediction
    disk_lookups: int = 0
    files_failed: list = field(default_factory=list)


def _new_files(fs: pafs.FileSystem, folder: str, seen: set[str]) -> list[str]:
    return [path for path in list_files(fs, folder) if path not in seen]


def _version_of(path: str) -> int | None:
    for part in path.split("/"):
        if part.startswith("version=") and part[8:].isdigit():
            return int(part[8:])
    return None


def last_per_key(table: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    """One row per value of `keys`: the last by `order` (ascending; ties: the later in the table), the rows kept
    in that order."""
    if table.num_rows == 0:
        return table
    position = pa.array(np.arange(table.num_rows, dtype=np.int64))
    ordered = table.append_column("_pos", position).sort_by([(c, "ascending") for c in order] + [("_pos", "ascending")])
    ordered = ordered.set_column(ordered.schema.get_field_index("_pos"), "_pos", position)
    last = ordered.group_by(keys, use_threads=False).aggregate([("_pos", "max")])["_pos_max"]
    return ordered.take(pc.take(last, pc.sort_indices(last))).drop_columns(["_pos"])


def _latest_labels(table: pa.Table) -> tuple[pa.Table, int]:
    """One label per (request_id, row): the latest received_at (ties: the later one in the table)."""
    keep = last_per_key(table, _KEYS, ["received_at"])
    return keep, table.num_rows - keep.num_rows


class ModelJoin:
    """The label join of one model (see the module doc). `outputs`: the log columns of its outputs to keep."""

    def __init__(self, data_dir: str, model: str, outputs: list[str], *, label_window_days: float = 14.0,
                 max_predictions: int = 1_000_000, disk_interval_s: float = 60.0,
                 list_interval_s: float | None = None):
        self.model = model
        location = locate(data_dir)
        self.fs = location.fs
        self.traffic = location.sub("traffic", model)
        self.labels_dir = location.sub("labels", model)
        self.list_interval_s = (0.0 if location.local else REMOTE_LIST_INTERVAL_S) if list_interval_s is None \
            else list_interval_s
        self._last_list = -float("inf")
        self.outputs = list(outputs)
        self.window_us = int(label_window_days * 86400 * 1e6)
        self.max_predictions = max_predictions
        self.disk_interval_s = disk_interval_s
        self._seen_predictions: set[str] = set()
        self._seen_labels: set[str] = set()
        self._memory: list[pa.Table] = []
        self._memory_rows = 0
        self._evicted = False  # predictions left memory: a pending label may need the disk
        self._pending: pa.Table | None = None
        self._last_disk = 0.0
        self.counts = JoinCounts()

    def _columns(self) -> list[str]:
        return ["request_id", "row", "timestamp", *self.outputs]

    def _read_predictions(self, paths: list[str]) -> pa.Table | None:
        tables = []
        for path in paths:
            try:
                t = pq.read_table(path, columns=self._columns(), filesystem=self.fs)
            except Exception as exc:  # noqa: BLE001 - a foreign or broken file is reported, not fatal
                self.counts.files_failed.append(f"{path}: {exc}")
                _log.warning("model %s: cannot read prediction file %s: %s", self.model, path, exc)
                self._seen_predictions.add(path)
                continue
            self._seen_predictions.add(path)
            version = _version_of(path)
            tables.append(t.append_column("version", pa.array(np.full(t.num_rows, version or 0, np.int32))))
        return pa.concat_tables(tables) if tables else None

    def _read_labels(self, paths: list[str]) -> pa.Table | None:
        tables = []
        for path in paths:
            self._seen_labels.add(path)
            try:
                tables.append(pq.read_table(path, columns=["request_id", "row", "label", "received_at"],
                                            filesystem=self.fs))
            except Exception as exc:  # noqa: BLE001
                self.counts.files_failed.append(f"{path}: {exc}")
                _log.warning("model %s: cannot read label file %s: %s", self.model, path, exc)
        return pa.concat_tables(tables, promote_options="permissive") if tables else None

    def _remember(self, predictions: pa.Table) -> None:
        self._memory.append(predictions)
        self._memory_rows += predictions.num_rows
        while len(self._memory) > 1 and self._memory_rows - self._memory[0].num_rows >= self.max_predictions:
            self._memory_rows -= self._memory.pop(0).num_rows
            self._evicted = True
        if len(self._memory) > 16:  # fewer, larger tables: one join input
            self._memory = [pa.concat_tables(self._memory)]

    def _join(self, labels: pa.Table, predictions: pa.Table) -> pa.Table:
        return labels.join(predictions, keys=_KEYS, join_type="inner", use_threads=False)

    def scan(self, now_s: float | None = None) -> pa.Table | None:
        """Read what is new and join it; the newly joined rows (or None). Counts in `self.counts`."""
        now_us = int((now_s if now_s is not None else time.time()) * 1e6)
        new_predictions = new_labels = None
        if time.monotonic() - self._last_list >= self.list_interval_s:
            self._last_list = time.monotonic()
            new_predictions = self._read_predictions(_new_files(self.fs, self.traffic, self._seen_predictions))
            new_labels = self._read_labels(_new_files(self.fs, self.labels_dir, self._seen_labels))
        joined = []
        old_pending = self._pending
        if new_labels is not None and new_labels.num_rows:
            self.counts.labels += new_labels.num_rows
            new_labels, dup = _latest_labels(new_labels)
            self.counts.duplicates += dup
            if old_pending is not None and old_pending.num_rows:
                # A newer label of a pending (request_id, row) replaces it.
                before = old_pending.num_rows
                old_pending = old_pending.join(new_labels.select(_KEYS), keys=_KEYS, join_type="left anti",
                                               use_threads=False)
                self.counts.duplicates += before - old_pending.num_rows
        if new_predictions is not None and new_predictions.num_rows:
            self._remember(new_predictions)
        memory = pa.concat_tables(self._memory) if self._memory else None
        matched_keys = []
        if new_labels is not None and new_labels.num_rows and memory is not None:
            hit = self._join(new_labels, memory)
            joined.append(hit)
            matched_keys.append(hit.select(_KEYS))
        if old_pending is not None and old_pending.num_rows and new_predictions is not None:
            hit = self._join(old_pending, new_predictions)
            joined.append(hit)
            matched_keys.append(hit.select(_KEYS))
        waiting = [t for t in (old_pending, new_labels) if t is not None and t.num_rows]
        pending = pa.concat_tables(waiting, promote_options="permissive") if waiting else None
        if pending is not None and matched_keys:
            pending = pending.join(pa.concat_tables(matched_keys), keys=_KEYS, join_type="left anti",
                                   use_threads=False)
        if pending is not None and pending.num_rows and self._evicted \
                and (now_s or time.time()) - self._last_disk >= self.disk_interval_s:
            self._last_disk = now_s or time.time()
            hit = self._disk_lookup(pending, now_us)
            if hit is not None and hit.num_rows:
                joined.append(hit)
                pending = pending.join(hit.select(_KEYS), keys=_KEYS, join_type="left anti", use_threads=False)
        if pending is not None and pending.num_rows:
            received = pending["received_at"].cast(pa.int64()).to_numpy()
            expired = received < now_us - self.window_us
            if expired.any():
                self.counts.unmatched += int(expired.sum())
                pending = pending.filter(pa.array(~expired))
        self._pending = pending
        self.counts.pending = pending.num_rows if pending is not None else 0
        out = pa.concat_tables(joined, promote_options="permissive") if joined else None
        if out is not None:
            # A prediction joined twice (its label corrected later): the later label counts as a relabel.
            self.counts.joined += out.num_rows
        return out

    def _disk_lookup(self, pending: pa.Table, now_us: int) -> pa.Table | None:
        """Predictions of pending labels on disk, within the label window (a filtered scan of the log)."""
        if self.fs.get_file_info(self.traffic).type != pafs.FileType.Directory:
            return None
        self.counts.disk_lookups += 1
        since = time.strftime("%Y-%m-%d", time.gmtime((now_us - self.window_us) / 1e6))
        dataset = ds.dataset(self.traffic, format="parquet", partitioning=ds.partitioning(_PARTITIONS, flavor="hive"),
                             exclude_invalid_files=True, filesystem=self.fs)
        ids = pa.array(pc.unique(pending["request_id"]))
        found = dataset.to_table(columns=[*self._columns(), "version"],
                                 filter=(ds.field("date") >= since) & ds.field("request_id").isin(ids))
        return self._join(pending, found) if found.num_rows else None
