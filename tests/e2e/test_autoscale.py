"""Autoscaling on fleet's own load: a load step takes the ingress from 1 to 3 replicas and the model's workers
from 1 to 2, and both back to 1 after it, with every request answered. The same cluster (split: fraud in its
own worker deployment) traces 1 % of requests and every one that comes with a sampled W3C traceparent, and logs
JSON lines: a traced request is followed across the Ray call into the worker, and its error line carries its ids.

The requests arrive on the ingress replicas' own sockets, where Serve's autoscaler cannot see them: each replica
reports them (`record_autoscaling_stats`) and fleet's policy scales on them (serving/autoscale.py); the workers
(fraud split into its own deployment) scale on the batches in flight to them. How fast (the 15 s goal) is
measured over repeated trials by `python -m benchmarks.cluster_scale`, not asserted here.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
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
tracing_sample_ratio: 0.01
log_format: json
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _body() -> bytes:
    return orjson.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]})


def test_a_load_step_scales_the_ingress_and_workers_up_and_back_down_without_a_failed_request(
        tmp_path: Path, trained):
    began = time.time()
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
        traced = _traced_requests(port)
    finally:
        down = run(["fleet", "down", "--state-dir", str(tmp_path / "state"), *flags], tmp_path, env)
        assert down.returncode == 0, down.stdout + down.stderr
    _check_traces(tmp_path / "state" / "traces", traced)
    _check_json_logs(traced, began)


def _traced_requests(port: int) -> list[str]:
    """Send two requests with a sampled traceparent (one refused): each answer carries a traceparent of the same
    trace, its own span. The answered spans' ids."""
    spans = []
    for i, (rows, width) in enumerate(((1, 30), (2, 29))):  # the second: a feature short, refused
        body = orjson.dumps({"id": f"traced-{i}", "inputs": [{"name": "features", "shape": [rows, width],
                                                             "datatype": "FP32", "data": [0.1] * rows * width}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/fraud/infer", data=body, headers={
            "Content-Type": "application/json", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b{i}-01"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, header = answer.status, answer.headers["traceparent"]
        except urllib.error.HTTPError as exc:
            status, header = exc.code, exc.headers["traceparent"]
        assert status == (200 if i == 0 else 400)
        version, trace_id, span_id, flags = header.split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01") and span_id != f"00f067aa0ba902b{i}"
        spans.append(span_id)
    return spans


def _check_traces(folder: Path, spans: list[str]) -> None:
    """The answered request's spans (written as JSON lines at the replicas' stop): parse, queue, encode under its
    infer span; a batch span linked to it with compute, and the worker's execute span under compute, in the
    worker replica's own file (the other side of the Ray call)."""
    records = {}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            doc = orjson.loads(line)
            records.setdefault(path.name.split("-")[0], []).append(doc)
    ingress, workers = records.get("ingress", []), records.get("worker", [])
    infer = [s for s in ingress if s["trace_id"] == TRACE_ID and s["name"] == "infer"]
    assert {s["span_id"] for s in infer} == set(spans), infer
    answered = next(s for s in infer if s["span_id"] == spans[0])
    children = {s["name"] for s in ingress if s["parent_span_id"] == answered["span_id"]}
    assert {"parse", "queue", "encode"} <= children, children
    refused = next(s for s in infer if s["span_id"] == spans[1])
    assert refused["status"] == "ERROR" and "29" in refused.get("error", ""), refused
    batch = next(s for s in ingress if s["name"] == "batch"
                 and {"trace_id": TRACE_ID, "span_id": spans[0]} in s.get("links", []))
    compute = next(s for s in ingress if s["parent_span_id"] == batch["span_id"] and s["name"] == "compute")
    execute = [s for s in workers if s["parent_span_id"] == compute["span_id"]]
    assert [s["name"] for s in execute] == ["execute"] and execute[0]["trace_id"] == batch["trace_id"], workers[:3]


def _check_json_logs(spans: list[str], since: float) -> None:
    """fleet's own lines in the replicas' Serve logs, as JSON: the refused request's, with its ids.

    Every Ray session's replica logs written since the test began, not session_latest's: make test runs
    another Ray cluster beside the e2e tests (the pure-Python pass), and the newest session may be that one."""
    lines = []
    for path in Path("/tmp/ray").glob("session_*/logs/serve/replica_*.log"):
        if path.parts[3] == "session_latest" or path.stat().st_mtime < since:  # (a link to one of the others)
            continue
        for line in path.read_text(errors="replace").splitlines():
            if TRACE_ID in line:
                lines.append(orjson.loads(line))
    refused = [doc for doc in lines if doc.get("request_id") == "traced-1"]
    assert refused and refused[0]["trace_id"] == TRACE_ID and refused[0]["model"] == "fraud", lines
    assert refused[0]["event"] == "error" and refused[0]["logger"] == "fleet.service" and "29" in refused[0]["message"]
