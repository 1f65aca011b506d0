"""Autoscaling on fleet's own load: a load step takes the ingress from 1 to 3 replicas and the model's workers
from 1 to 2, and both back to 1 after it, with every request answered.

The requests arrive on the ingress replicas' own sockets, where Serve's autoscaler cannot see them: each replica
reports them (`record_autoscaling_stats`) and fleet's policy scales on them (serving/autoscale.py); the workers
(fraud split into its own deployment) scale on the batches in flight to them. How fast (the 15 s goal) is
measured over repeated trials by `python -m benchmarks.cluster_scale`, not asserted here.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from benchmarks.loadgen import Target, closed_loop, open_loop
from cluster.status import _replicas
from e2e._user import fleet_up, run, user_folder
from serving.app import INGRESS_NAME, worker_name

pytestmark = pytest.mark.e2e

SETTINGS = """\
placement: split
ingress_autoscaling: {min_replicas: 1, max_replicas: 3, target_load: 4, upscale_delay_s: 1,
                      downscale_delay_s: 3, look_back_s: 2}
worker_autoscaling: {min_replicas: 1, max_replicas: 2, target_load: 1, upscale_delay_s: 1,
                     downscale_delay_s: 3, look_back_s: 2}
"""


def _body() -> bytes:
    return orjson.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]})


def test_a_load_step_scales_the_ingress_and_workers_up_and_back_down_without_a_failed_request(
        tmp_path: Path, trained):
    env = user_folder(tmp_path, trained)
    (tmp_path / "fleet.yaml").write_text(SETTINGS)
    env["FLEET_CONFIG"] = str(tmp_path / "fleet.yaml")
    up, flags = fleet_up(["--state-dir", str(tmp_path / "state")], tmp_path, env)
    port, dashboard = int(flags[1]), f"http://127.0.0.1:{flags[3]}"
    target = [Target("/v2/models/fraud/infer", _body(), {"Content-Type": "application/json"})]

    def running() -> tuple[int, int]:
        counts = _replicas(dashboard)[0]
        return counts.get(INGRESS_NAME, 0), counts.get(worker_name("fraud"), 0)

    async def until(replicas: tuple[int, int], load, timeout_s: float) -> tuple[float | None, list]:
        """Run `load` in 3 s rounds (new connections each: the kernel spreads them over the listeners) until
        `replicas` (ingress, worker) run; (seconds it took or None, the rounds' results)."""
        started, runs = time.monotonic(), []
        while time.monotonic() - started < timeout_s:
            runs.append(await load(len(runs)))
            if running() == replicas:
                return time.monotonic() - started, runs
        return None, runs

    async def scenario():
        heavy = await until((3, 2), lambda k: closed_loop("127.0.0.1", port, target, 24, 3.0, timeout_s=30, seed=k),
                            90)
        light = await until((1, 1), lambda k: open_loop("127.0.0.1", port, target, 20, 3.0, seed=k,
                                                        max_connections=4, timeout_s=30), 90)
        tail = await open_loop("127.0.0.1", port, target, 20, 2.0, seed=99, max_connections=4, timeout_s=30)
        return heavy, light, tail

    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert running() == (1, 1)
        (up_s, heavy), (down_s, light), tail = asyncio.run(scenario())
        runs = [*heavy, *light, tail]
        requests = sum(r.requests for r in runs)
        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        for r in runs:
            for code, n in r.statuses.items():
                statuses[code] = statuses.get(code, 0) + n
            for kind, n in r.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        print(f"\nautoscaling: ingress 1 -> 3 and worker 1 -> 2 replicas in {up_s} s of load, back to 1 each in "
              f"{down_s} s after it; {requests} requests, statuses {statuses}, errors {errors}")
        assert up_s is not None, f"not 3 ingress and 2 worker replicas under load: {running()} running"
        assert down_s is not None, f"not back to 1 ingress and 1 worker replica after the load: {running()} running"
        assert sum(errors.values()) == 0, errors
        assert statuses == {"200": requests}, statuses
        assert running() == (1, 1)
    finally:
        down = run(["fleet", "down", "--state-dir", str(tmp_path / "state"), *flags], tmp_path, env)
        assert down.returncode == 0, down.stdout + down.stderr
