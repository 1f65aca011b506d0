"""A rolling update of the whole application under load loses no request.

`serve.run` of the app again replaces every replica, a few at a time: each ingress
replica stops taking connections (the others get them), answers what it has read and
what is queued, then exits; worker replicas finish their calls first. A steady load
on `fraud` and requests queued on the slow model run across it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import orjson
import pyarrow.dataset as ds
import pytest
from ray import serve
from ray.util.state import list_actors

from benchmarks.loadgen import Target, open_loop
from serving.app import APP_NAME, build_app

pytestmark = pytest.mark.integration


def _replica_pids(suffix: str) -> set[int]:
    return {a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name and a.class_name.endswith(suffix)}


def _logged(data_dir: str, model: str) -> int:
    folder = f"{data_dir}/traffic/{model}"
    return ds.dataset(folder, partitioning="hive").count_rows() if os.path.isdir(folder) else 0


def test_a_rolling_update_under_load_loses_no_request(fleet_cluster, base_url):
    settings = fleet_cluster[0]
    time.sleep(2 * settings.log_flush_interval_s)  # what earlier tests sent is on disk
    logged_before = _logged(settings.data_dir, "fraud")
    body = orjson.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                     "data": [0.1] * 30}]})
    target = [Target("/v2/models/fraud/infer", body, {"Content-Type": "application/json"})]
    slow_body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})
    before = _replica_pids(":ingress")
    assert len(before) == 2

    done = threading.Event()
    failure: list[BaseException] = []

    def redeploy() -> None:
        try:
            app = build_app(settings.serving_options(), settings.deployment_options(gpus_available=False))
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
        except BaseException as exc:  # reported by the test
            failure.append(exc)
        finally:
            done.set()

    async def load() -> list:
        runs = []
        async with httpx.AsyncClient(timeout=60) as client:
            # Queued on the slow model when the update starts: they must be answered, not dropped.
            queued = [asyncio.create_task(client.post(f"{base_url}/v2/models/slow_deep/infer", content=slow_body,
                                                      headers={"content-type": "application/json"}))
                      for _ in range(8)]
            started = time.monotonic()
            updater = threading.Thread(target=redeploy)
            updater.start()
            while not done.is_set() and time.monotonic() - started < 240:
                runs.append(await open_loop(settings.host, settings.port, target, 100, duration_s=3.0,
                                            seed=len(runs), max_connections=16, timeout_s=30))
            runs.append(await open_loop(settings.host, settings.port, target, 100, duration_s=2.0, seed=99,
                                        max_connections=16, timeout_s=30))
            slow = await asyncio.gather(*queued)
            updater.join()
        return runs, slow, time.monotonic() - started

    runs, slow, took = asyncio.run(load())
    assert not failure, failure
    requests = sum(r.requests for r in runs)
    errors = {k: sum(r.errors.get(k, 0) for r in runs) for k in ("connect", "read", "write", "timeout")}
    statuses: dict[str, int] = {}
    for r in runs:
        for code, n in r.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    print(f"\nrolling update under load: {took:.0f} s, {requests} requests, statuses {statuses}, errors {errors}")
    assert [r.status_code for r in slow] == [200] * len(slow), [r.text for r in slow if r.status_code != 200]
    assert sum(errors.values()) == 0, errors
    assert statuses == {"200": requests}, statuses
    after = _replica_pids(":ingress")
    assert len(after) == 2 and not after & before  # every ingress replica was replaced
    # Every answered request is in the prediction log: the replicas that left wrote their buffers as they drained.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _logged(settings.data_dir, "fraud") - logged_before < requests:
        time.sleep(0.5)
    assert _logged(settings.data_dir, "fraud") - logged_before == requests
