"""A prediction-log sink that cannot be written: serving goes on, memory stays bounded, every row is accounted for.

`<data>/traffic/fraud_stall` is made a plain file, so the writer cannot create the model's folder
(a real ENOTDIR from the filesystem, as an unwritable mount would give). 400,000 rows are sent, 20
times what a replica's log buffer holds (log_buffer_rows 20,000 in the test cluster).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from ray.util.state import list_actors

from integration._monitoring import metric_value, read_log, wait_until

pytestmark = pytest.mark.integration

ROWS_PER_REQUEST = 200  # the test cluster's max_batch_rows
REQUESTS = 2000


def _ingress_rss_bytes() -> int:
    total = 0
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name and actor.class_name.endswith(":ingress"):
            with open(f"/proc/{actor.pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    assert total, "no ingress replica found"
    return total


def _binary_body(x: np.ndarray) -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]})
    return header + x.astype("<f4").tobytes(), len(header)


def _counts(base_url: str) -> tuple[float, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    written = metric_value(text, "fleet_prediction_log_rows_total", model="fraud_stall") or 0.0
    dropped = metric_value(text, "fleet_prediction_log_dropped_total", model="fraud_stall") or 0.0
    return written, dropped


def test_a_stalled_sink_keeps_serving_with_bounded_memory_and_counted_drops(fleet_cluster, base_url):
    settings = fleet_cluster[0]
    blocker = Path(settings.data_dir) / "traffic" / "fraud_stall"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder: the prediction log of fraud_stall cannot be written\n")
    x = np.random.default_rng(5).normal(size=(ROWS_PER_REQUEST, 30)).astype(np.float32)
    body, header_length = _binary_body(x)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    with httpx.Client(timeout=30) as client:  # warm the replicas up first: their memory before the flood
        assert client.post(f"{base_url}/v2/models/fraud_stall/infer", content=body, headers=headers).status_code == 200
    before = _ingress_rss_bytes()
    statuses = []
    clients = [httpx.Client(timeout=30) for _ in range(4)]  # four connections: both replicas take part
    try:
        for i in range(REQUESTS):
            statuses.append(clients[i % 4].post(f"{base_url}/v2/models/fraud_stall/infer", content=body,
                                                headers=headers).status_code)
    finally:
        for c in clients:
            c.close()
    after = _ingress_rss_bytes()
    assert statuses == [200] * REQUESTS  # serving went on
    sent = (REQUESTS + 1) * ROWS_PER_REQUEST
    # Each replica holds at most 20,000 rows (~5 MB of arrays); 400,000 rows held would be over 100 MB.
    growth_mb = (after - before) / 2**20
    print(f"ingress RSS {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB over {sent} rows not written")
    assert growth_mb < 40, f"the ingress replicas grew by {growth_mb:.0f} MB while the sink stalled"
    written, dropped = wait_until(lambda: (c := _counts(base_url))[1] >= sent - 2 * 20_000 and c, 15,
                                  what="drops counted")
    assert written == 0 and sent - 2 * 20_000 <= dropped < sent

    # The sink recovers: what the buffers held is written, and every row sent is written or counted dropped.
    blocker.unlink()
    written, dropped = wait_until(lambda: (c := _counts(base_url))[0] + c[1] >= sent and c, 60,
                                  what="the buffered rows written after the sink recovered")
    assert written + dropped == sent and written > 0
    assert read_log(settings.data_dir, "fraud_stall").num_rows == written
