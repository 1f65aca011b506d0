"""What `benchmarks.rollout_trials` uses to drive a live cluster: open-loop streams of single-row requests that count
every answer by status and version, the rollout admin routes and /metrics, and per-version counters from /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson

from benchmarks.live_cluster import metric_sum

__all__ = ["Stream", "Admin", "request_rows", "version_counts", "model_batches", "rows_per_batch", "mean_latency"]


# -- the load ----------------------------------------------------------------------------------------
def request_rows(n: int, seed: int) -> list[bytes]:
    """JSON fragments of `n` single-row fraud requests (baseline traffic), each to follow an id."""
    from training.datasets import make_fraud

    x, _ = make_fraud(n, seed=seed, scenario="baseline")
    return [b'","inputs":[{"name":"features","shape":[1,30],"datatype":"FP32","data":' + orjson.dumps(row.tolist())
            + b"}]}" for row in x.astype(np.float32)]


class Stream:
    """Open-loop single-row requests to one model at `rate_rps` (request i due at i / rate, ids
    `<model>-<i>`), every answer counted by (status, model_version) into the totals and the open windows."""

    def __init__(self, session, url: str, model: str, rows: list[bytes], rate_rps: float):
        self.session, self.model, self.rows, self.rate = session, model, rows, rate_rps
        self.url = f"{url}/v2/models/{model}/infer"
        self.total: Counter = Counter()
        self.windows: list[Counter] = []
        self.latencies: list[float] | None = None  # kept while a caller wants them (the shadow probe)
        self.errors: list[str] = []  # the first few non-200 answers, for the report
        self.sent = 0
        self._running = False
        self._tasks: set = set()

    async def run(self) -> None:
        """Send until `stop()`; a late loop sends the requests due meanwhile at once (open loop)."""
        loop = asyncio.get_running_loop()
        t0, i = loop.time(), 0
        self._running = True
        while self._running:
            due = t0 + i / self.rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                if not self._running:
                    break
            task = loop.create_task(self._one(self.sent, due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            self.sent += 1
            i += 1

    async def _one(self, i: int, due: float) -> None:
        loop = asyncio.get_running_loop()
        body = b'{"id":"' + f"{self.model}-{i}".encode() + self.rows[i % len(self.rows)]
        version = None
        try:
            async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                status = r.status
        except Exception as exc:  # noqa: BLE001 - a transport error is a client-visible error, recorded
            status, raw = -1, repr(exc).encode()
        latency = loop.time() - due
        if status == 200:
            version = orjson.loads(raw).get("model_version")
        elif len(self.errors) < 20:
            self.errors.append(f"{status}: {raw[:200].decode(errors='replace')}")
        key = (status, version)
        self.total[key] += 1
        for w in self.windows:
            w[key] += 1
        if self.latencies is not None:
            self.latencies.append(latency)

    async def stop(self) -> None:
        """Stop sending; wait for the answers in flight."""
        self._running = False
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=60)


# -- the cluster's side ----------------------------------------------------------------------------------
class Admin:
    """The rollout admin routes and /metrics, through the run's aiohttp session."""

    def __init__(self, session, url: str, token: str, data_dir: str):
        self.session, self.url = session, url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.audit = Path(data_dir) / "audit" / "rollout.jsonl"

    async def rollout(self, model: str, attempts: int = 10) -> dict:
        """The model's rollout state; a failed GET (the monitor actor busy) is tried again for ~20 s."""
        for attempt in range(attempts):
            try:
                async with self.session.get(f"{self.url}/v2/models/{model}/rollout", headers=self.headers) as r:
                    if r.status == 200:
                        return await r.json()
                    error = f"{r.status} {await r.text()}"
            except Exception as exc:  # noqa: BLE001 - aiohttp's errors and timeouts alike: ask again
                error = repr(exc)
            await asyncio.sleep(2.0)
        raise RuntimeError(f"GET rollout of {model}: {error}")

    async def act(self, model: str, action: str) -> dict:
        async with self.session.post(f"{self.url}/v2/models/{model}/rollout/{action}", json={},
                                     headers=self.headers) as r:
            doc = await r.json()
            if r.status != 200:
                raise RuntimeError(f"POST rollout/{action} of {model}: {r.status} {doc}")
            return doc

    async def metrics(self) -> str:
        async with self.session.get(f"{self.url}/metrics") as r:
            return await r.text()

    async def wait(self, model: str, check, timeout_s: float, what: str, every_s: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            state = await self.rollout(model)
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model}: {what} not reached within {timeout_s:.0f} s: "
                                   f"{ {k: state.get(k) for k in ('status', 'stable', 'candidate', 'weight')} }")
            await asyncio.sleep(every_s)

    def decision_record(self, model: str, version: int) -> dict | None:
        """The controller's audit record that ended `version`'s rollout (rollback, promote, abort)."""
        found = None
        for line in self.audit.read_text().splitlines():
            r = json.loads(line)
            if r.get("model") == model and r.get("version") == version and r.get("event") in (
                    "rollback", "promote", "abort", "supersede"):
                found = r
        return found


def version_counts(metrics: str, model: str, version: int) -> dict:
    """(requests, mean latency s) of one model version from /metrics: successes + failures, and the
    successes' mean end-to-end time."""
    def one(name: str, **labels) -> float:
        return (metric_sum(metrics, name + "_total", model=model, version=str(version), **labels)
                or metric_sum(metrics, name, model=model, version=str(version), **labels) or 0.0)

    success = one("fleet_inference_request_success")
    failure = one("fleet_inference_request_failure")
    time_s = one("fleet_inference_request_time_seconds")
    return {"success": success, "failure": failure, "time_s": time_s}


def model_batches(metrics: str, model: str) -> tuple[float, float]:
    """(rows run, model executions) of every version of `model`, from /metrics."""
    def total(name: str) -> float:
        return metric_sum(metrics, name + "_total", model=model) or metric_sum(metrics, name, model=model) or 0.0

    return total("fleet_inference_count"), total("fleet_inference_exec_count")


def rows_per_batch(before: str, after: str, model: str) -> float | None:
    (r0, e0), (r1, e1) = model_batches(before, model), model_batches(after, model)
    return round((r1 - r0) / (e1 - e0), 3) if e1 > e0 else None


def mean_latency(before: dict, after: dict) -> float | None:
    n = after["success"] - before["success"]
    return (after["time_s"] - before["time_s"]) / n if n > 0 else None
