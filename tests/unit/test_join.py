"""The monitor's label join: labels before or after their predictions, the last label wins, predictions that
left memory found on disk, labels that never match counted after the window."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.model_config import TensorSpec
from serving.monitoring.feedback import LabelWriter, Labels
from serving.monitoring.join import ModelJoin
from serving.monitoring.logrows import LogRecord, LogSchema
from serving.monitoring.predlog import PredictionLog


class Spec:
    name = "m"
    parameters: dict = {}
    inputs = (TensorSpec("features", "FP32", (2,)),)
    outputs = (TensorSpec("probability", "FP32", (1,)),)


def log_rows(log: PredictionLog, ids: list[str], scores: list[float], version: int = 1) -> None:
    n = len(ids)
    log.append(LogRecord(model="m", version=version, date=time.strftime("%Y-%m-%d", time.gmtime()), rows=n,
                         request_ids=ids, request_rows=None, arrival_us=np.full(n, time.time_ns() // 1000, np.int64),
                         latency_us=np.ones(n, np.int64), queue_us=np.ones(n, np.int64), compute_us=1,
                         answered_by="model", key_ids=None, inputs={"features": np.zeros((n, 2), np.float32)},
                         outputs={"probability": np.asarray(scores, np.float32)[:, None]}))
    assert log.flush(10)


def label(writer: LabelWriter, pairs: list[tuple[str, int]], received_us: int | None = None) -> None:
    writer.write("m", Labels([p for p, _ in pairs], np.zeros(len(pairs), np.int32),
                             np.asarray([v for _, v in pairs], np.int64), 0), received_us)


@pytest.fixture
def sinks(tmp_path):
    log = PredictionLog(str(tmp_path), "r1", flush_rows=1, flush_interval_s=60)
    log.register("m", 1, LogSchema(Spec, {}))
    log.register("m", 2, LogSchema(Spec, {}))
    yield tmp_path, log, LabelWriter(str(tmp_path), "w1")
    log.close()


def joined(table) -> dict:
    return {r: (l, v, s) for r, l, v, s in zip(table["request_id"].to_pylist(), table["label"].to_pylist(),
                                                table["version"].to_pylist(), table["probability"].to_pylist())}


def test_labels_join_whenever_they_come_and_the_latest_one_wins(sinks):
    root, log, writer = sinks
    join = ModelJoin(str(root), "m", ["probability"])
    label(writer, [("early", 1)])  # before its prediction exists
    assert join.scan() is None and join.counts.pending == 1
    log_rows(log, ["early", "a", "b"], [0.9, 0.2, 0.4])
    label(writer, [("a", 1), ("b", 0), ("b", 1)])  # b twice in a body written as is: the later wins
    first = joined(join.scan())
    assert first == {"early": (1, 1, pytest.approx(0.9)), "a": (1, 1, pytest.approx(0.2)),
                     "b": (1, 1, pytest.approx(0.4))}
    assert join.counts.duplicates == 1 and join.counts.pending == 0 and join.counts.joined == 3
    log_rows(log, ["c"], [0.5], version=2)
    label(writer, [("c", 0)], received_us=time.time_ns() // 1000)
    label(writer, [("c", 1)], received_us=time.time_ns() // 1000 + 5)  # a later file: the later label
    assert joined(join.scan()) == {"c": (1, 2, pytest.approx(0.5))}


def test_a_prediction_that_left_memory_is_found_on_disk(sinks):
    root, log, writer = sinks
    join = ModelJoin(str(root), "m", ["probability"], max_predictions=2, disk_interval_s=0.0)
    log_rows(log, ["old-1", "old-2"], [0.1, 0.2])
    assert join.scan() is None
    log_rows(log, ["new-1", "new-2", "new-3"], [0.3, 0.4, 0.5])  # memory keeps the newest batch only
    assert join.scan() is None
    label(writer, [("old-1", 1), ("new-2", 0)])
    got = joined(join.scan())
    assert got == {"new-2": (0, 1, pytest.approx(0.4)), "old-1": (1, 1, pytest.approx(0.1))}
    assert join.counts.disk_lookups == 1


def test_labels_without_a_prediction_expire_after_the_window_and_are_counted(sinks):
    root, log, writer = sinks
    join = ModelJoin(str(root), "m", ["probability"], label_window_days=1.0)
    label(writer, [("ghost", 1)], received_us=int((time.time() - 2 * 86400) * 1e6))
    label(writer, [("soon", 0)])
    assert join.scan() is None
    assert join.counts.unmatched == 1 and join.counts.pending == 1
