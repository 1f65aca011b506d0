"""The data folder on S3 (a real S3-compatible server on loopback, _s3.py): the prediction log and the labels
written there whole, joined by the monitor, and read by a training job that publishes through an s3:// repository."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import numpy as np
import pyarrow.parquet as pq
import torch

from serving.model_config import TensorSpec
from serving.monitoring.feedback import LabelWriter, Labels
from serving.monitoring.join import ModelJoin
from serving.monitoring.logrows import LogRecord, LogSchema
from serving.monitoring.predlog import PredictionLog
from serving.registry import ModelRepository
from serving.storage import list_files, locate
from training.artifacts import export_torchscript
from training.bootstrap import FRAUD_FEATURES, TrainParams, fit_fraud, reference_stats
from training.data import HOLDOUT_PERCENT, find_sources, fraud_traffic, split_buckets
from training.datasets import make_fraud
from training.publish import publish_candidate, read_bytes
from unit._traffic_helpers import T0, log_fraud


class Spec:
    name = "m"
    parameters: dict = {}
    inputs = (TensorSpec("features", "FP32", (2,)),)
    outputs = (TensorSpec("probability", "FP32", (1,)),)


def log_rows(log: PredictionLog, ids: list[str], scores: list[float]) -> None:
    n = len(ids)
    log.append(LogRecord(model="m", version=1, date=time.strftime("%Y-%m-%d", time.gmtime()), rows=n,
                         request_ids=ids, request_rows=None, arrival_us=np.full(n, time.time_ns() // 1000, np.int64),
                         latency_us=np.ones(n, np.int64), queue_us=np.ones(n, np.int64), compute_us=1,
                         answered_by="model", key_ids=None, inputs={"features": np.zeros((n, 2), np.float32)},
                         outputs={"probability": np.asarray(scores, np.float32)[:, None]}))
    assert log.flush(10)


def label(writer: LabelWriter, pairs: list[tuple[str, int]]) -> str:
    return writer.write("m", Labels([p for p, _ in pairs], np.zeros(len(pairs), np.int32),
                                    np.asarray([v for _, v in pairs], np.int64), 0))


def test_log_and_labels_are_written_to_s3_as_whole_objects_and_the_monitor_joins_them(s3_server):
    data = s3_server.uri("data-join")
    log = PredictionLog(data, "r1", flush_rows=1, flush_interval_s=60)
    log.register("m", 1, LogSchema(Spec, {}))
    writer = LabelWriter(data, "w1")
    join = ModelJoin(data, "m", ["probability"], max_predictions=2, disk_interval_s=0.0)
    assert join.list_interval_s == 10.0  # an object store: listed at most every 10 s ...
    join.list_interval_s = 0.0  # ... here at every scan
    try:
        mark = s3_server.mark()
        log_rows(log, ["old-1", "old-2"], [0.1, 0.2])
        written = s3_server.requests_since(mark)
        # One object, uploaded whole: no temporary file renamed (a copy and a DELETE), no folder markers.
        assert {method for method, _ in written} <= {"PUT", "POST"}, written
        assert len({path.split("?")[0] for _, path in written}) == 1, written
        assert join.scan() is None
        log_rows(log, ["new-1", "new-2", "new-3"], [0.3, 0.4, 0.5])  # memory keeps this batch only
        assert join.scan() is None
        path = label(writer, [("old-1", 1), ("new-2", 0)])
        got = join.scan()
        # old-1 left memory: found by a filtered dataset scan of the log on S3.
        assert dict(zip(got["request_id"].to_pylist(), got["label"].to_pylist())) == {"new-2": 0, "old-1": 1}
        assert join.counts.disk_lookups == 1 and join.counts.joined == 2
    finally:
        log.close()
    location = locate(data)
    assert path.startswith(location.sub("labels", "m", "date="))
    assert pq.read_table(path, filesystem=location.fs)["request_id"].to_pylist() == ["old-1", "new-2"]
    assert len(list_files(location.fs, location.sub("traffic", "m"))) == 2  # every object a whole Parquet file


def test_a_training_job_reads_logged_traffic_from_s3_and_publishes_through_an_s3_repository(s3_server):
    torch.set_num_threads(1)
    data, repo_uri = s3_server.uri("data-train"), s3_server.uri("repo-train")
    x, y = make_fraud(4_000, seed=7)
    ids = log_fraud(data, "fraud", x)  # the ingress replicas' own writer, into S3
    LabelWriter(data, "w1").write("fraud", Labels(ids, np.zeros(len(ids), np.int32), y.astype(np.int64), 0),
                                  received_us=int((T0 + timedelta(hours=1)).timestamp() * 1e6))
    joined, tx, ty = fraud_traffic(data, "fraud")
    assert joined.report["joined_rows"] == 4_000 and joined.report["traffic_dir"].startswith("s3://fleet-test/")
    order = [int(rid.split("-")[1]) for rid in joined.table["request_id"].to_pylist()]  # rows come keyed by id
    np.testing.assert_array_equal(ty, y[order])
    np.testing.assert_array_equal(tx, x[order].astype(np.float32))
    sources = find_sources(data, "fraud", joined)  # the example data is written to S3 first (none there yet)
    described = sources.describe()  # SHA-256 of every file, read through S3
    assert (described["example_files"], described["traffic_files"], described["label_files"]) == (1, 1, 1)

    reader = ModelRepository(repo_uri)  # a serving replica, polling while the job publishes
    seen: dict[int, tuple] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if reader.list_models() == ["fraud"]:
                for v in reader.list_versions("fraud"):
                    if v not in seen:
                        meta = reader.metadata("fraud", v)
                        seen[v] = (meta.get("gate", "no metadata"), len(read_bytes(reader.model_file("fraud", v))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        held = split_buckets(tx) < HOLDOUT_PERCENT
        model = fit_fraud(tx[~held], ty[~held], TrainParams(epochs=2), seed=0)
        version, meta = publish_candidate(
            ModelRepository(repo_uri), "fraud", export_torchscript(model.for_serving()), holdout=(tx[held], ty[held]),
            reference=reference_stats(tx[~held], FRAUD_FEATURES), x_train=tx[~held],
            training_data=described, params={}, training={}, log=lambda line: None)
    finally:
        time.sleep(0.2)  # the watcher's next look
        stop.set()
        watcher.join()
    assert version == 1 and meta["gate"] == "accepted"
    # Seen only whole: its metadata with the verdict, and the whole model file.
    assert seen == {1: ("accepted", len(read_bytes(reader.model_file("fraud", 1))))}
    assert reader.served_versions("fraud") == [1]
    assert reader.metadata("fraud", 1)["training_data"]["sha256"] == described["sha256"]
