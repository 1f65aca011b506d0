"""What the monitoring tests share: sending fraud rows, reading the log back, waiting for the monitor."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from training.datasets import make_fraud

__all__ = ["infer_rows", "read_log", "wait_until", "fraud_rows", "metric_value"]


def fraud_rows(n: int, seed: int, scenario: str = "baseline") -> tuple[np.ndarray, np.ndarray]:
    return make_fraud(n, seed=seed, scenario=scenario)


def infer_rows(base_url: str, model: str, x: np.ndarray, *, rows_per_request: int = 1, ids: list | None = None,
               fresh_connections: bool = True, headers: dict | None = None) -> list[dict]:
    """POST x in requests of `rows_per_request` rows (ids[i] as the i-th request's v2 id when given).

    A new connection per request (the kernel spreads them over both ingress replicas) unless told otherwise.
    Returns [{"id", "rows": (start, end), "outputs": float32 [k, 1], "status"}] per request.
    """
    answers = []
    client = None if fresh_connections else httpx.Client(timeout=30)
    try:
        for k, start in enumerate(range(0, len(x), rows_per_request)):
            part = x[start:start + rows_per_request]
            body: dict = {"inputs": [{"name": "features", "shape": list(part.shape), "datatype": "FP32",
                                      "data": part.ravel().tolist()}]}
            if ids is not None and ids[k] is not None:
                body["id"] = ids[k]
            if client is None:
                with httpx.Client(timeout=30) as c:
                    r = c.post(f"{base_url}/v2/models/{model}/infer", json=body, headers=headers)
            else:
                r = client.post(f"{base_url}/v2/models/{model}/infer", json=body, headers=headers)
            entry = {"rows": (start, start + len(part)), "status": r.status_code}
            if r.status_code == 200:
                doc = r.json()
                out = doc["outputs"][0]
                entry.update(id=doc.get("id"), outputs=np.asarray(out["data"], np.float32).reshape(out["shape"]))
            else:
                entry["error"] = r.text
            answers.append(entry)
    finally:
        if client is not None:
            client.close()
    return answers


def read_log(data_dir: str | Path, model: str, columns: list[str] | None = None) -> pa.Table:
    """The model's prediction log as one table (pyarrow.dataset over the hive-partitioned folder)."""
    folder = Path(data_dir) / "traffic" / model
    if not folder.is_dir():
        return pa.table({})
    return ds.dataset(folder, format="parquet", partitioning="hive").to_table(columns=columns)


def wait_until(check, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    """Call `check()` until it returns something truthy (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s (last: {last!r})")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample of /metrics text (labels matched exactly as given), or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
