"""`python -m benchmarks.soak`: minutes of load with faults injected, against a fleet started for the run.

    python -m benchmarks.soak                       # every scenario, 2 minutes each
    python -m benchmarks.soak --minutes 5 --scenarios replica_kill

Scenarios (the integration tests run each for seconds; these run it for minutes):

- `overload`: the `slow` model (~100 ms per batch of up to 8, queue of 8, in
  each ingress replica). Its sustainable rate is measured (closed loop), then it
  gets a third of it (the unloaded p99 of the answered requests) and 3 x it for
  the soak, with the ingress replicas' resident memory sampled every 5 s.
  Figures: p99 of the 200s at 3 x over p99 at a third (fleet's promise: <= 2),
  the refused share (503 with Retry-After), memory growth over the soak.
- `replica_kill`: `fraud_split` (fraud's model in a worker deployment of 2
  replicas, one Ray call per batch) at a steady open-loop rate while one worker
  replica is SIGKILLed every `--kill-every` seconds. Figures: the failure rate
  over the run (promise: <= 0.1 %), and per kill the recovery time — from the
  kill until the 2xx answers completed in each 1 s window keep up
  with >= 90 % of the requests sent (promise: < 10 s). (The recovery figure
  is the end of the last window that fell short.)
- `version_switch`: a new version of `fraud` (the same file) published every
  `--kill-every` seconds under the same steady load. Figures: failed requests
  (promise: none), the version serving at the end.

Results go to `benchmarks/results/<timestamp>-soak/`: report.json and summary.md,
with the git SHA and the config.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson

from benchmarks.fault_models import publish_slow
from benchmarks.loadgen import Target, closed_loop, open_loop, open_loop_records, run
from benchmarks.report import git_sha, machine
from benchmarks.scenarios import _host_port
from benchmarks.systems import FleetSystem
from serving.model_config import make_config
from serving.registry import ModelRepository

__all__ = ["recovery_s", "failure_rate", "overload_soak", "replica_kill_soak", "run_soak", "soak_goals",
           "soak_markdown", "publish_soak_models", "main"]

SCENARIOS = ("overload", "replica_kill", "version_switch")


def _slow_target() -> Target:
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})
    return Target("/v2/models/slow/infer", body, {"Content-Type": "application/json"})


def _fraud_target(model: str) -> Target:
    body = orjson.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                     "data": [0.1] * 30}]})
    return Target(f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})


def build_repository(folder: Path) -> ModelRepository:
    from training.bootstrap import bootstrap

    bootstrap(str(folder), rows=8000, epochs=2, log=lambda line: None)
    repo = ModelRepository(str(folder))
    publish_soak_models(repo)
    return repo


def publish_soak_models(repo: ModelRepository) -> None:
    """`slow` and `fraud_split` (from the repository's fraud version 1) for the soak scenarios; fraud itself
    switches to each new version at once (`fleet.rollout: immediate`): the version_switch scenario measures
    the switch, not a canary (benchmarks/rollout_trials.py does)."""
    publish_slow(repo, "slow", max_batch_size=8, max_queue_size=8)
    fraud = repo.config_proto("fraud")
    fraud.parameters["fleet.rollout"].string_value = "immediate"
    repo.write_config("fraud", fraud)
    spec = repo.spec("fraud")
    preprocess = {k: v for k, v in spec.parameters.items() if k.startswith("preprocess")}
    repo.publish("fraud_split", {"model.pt": _fraud_file(repo)}, repo.metadata("fraud", 1),
                 config=make_config("fraud_split", list(spec.inputs), list(spec.outputs), max_batch_size=256,
                                    max_queue_delay_us=1000, instance_count=2,
                                    parameters={"fleet.placement": "split", **preprocess}))


def _fraud_file(repo: ModelRepository) -> bytes:
    """The bytes of fraud version 1's model file (a local path or, remote, its bytes)."""
    source = repo.model_file("fraud", 1)
    with open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source) as f:
        return f.read()


def _load_while(system: FleetSystem, model: str, rate_rps: float, duration_s: float, seed: int,
                every_s: float, act, quiet_end_s: float):
    """A steady open-loop load on `model` for `duration_s` while `act(t_s)` runs in a thread every
    `every_s` seconds (t_s: since the load began), but not in its last `quiet_end_s`. (records, result)."""
    host, port = _host_port(system.url)
    stop = threading.Event()
    start = time.monotonic() + 0.005  # the schedule's origin, as open_loop_records takes it (near enough)

    def acting() -> None:
        while not stop.wait(every_s):
            if time.monotonic() - start > duration_s - quiet_end_s:
                return
            act(time.monotonic() - start)

    thread = threading.Thread(target=acting, daemon=True)
    thread.start()
    try:
        return run(open_loop_records(host, port, [_fraud_target(model)], rate_rps, duration_s,
                                     seed=seed, max_connections=64, timeout_s=30))
    finally:
        stop.set()
        thread.join()


def _actors(dashboard_url: str, suffix: str) -> list:
    from ray.util.state import list_actors

    from cluster.jobs import auth_env

    auth_env()  # the state API goes through the dashboard, which wants the cluster's token

    return [a for a in list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name and a.class_name.endswith(suffix)]


def _rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                out.append(next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024)
        except (OSError, StopIteration):
            out.append(float("nan"))
    return out


def failure_rate(records: np.ndarray) -> float:
    """Share of the requests that got no 2xx answer (transport errors included)."""
    if len(records) == 0:
        return 0.0
    ok = (records[:, 4] == 0) & (records[:, 2] >= 200) & (records[:, 2] < 300)
    return float(1.0 - ok.mean())


def recovery_s(records: np.ndarray, kill_s: float, until_s: float, window_s: float = 1.0, step_s: float = 0.25,
               keep_up: float = 0.9) -> float | None:
    """Seconds from `kill_s` until full throughput is back: the end of the last `window_s` window
    (windows start every `step_s` up to `until_s`) in which fewer 2xx answers completed than
    `keep_up` of the requests the schedule sent in it. 0 if none fell short, None if the last did."""
    ok = (records[:, 4] == 0) & (records[:, 2] >= 200) & (records[:, 2] < 300)
    done = np.sort(records[ok, 1] + records[ok, 3])
    sent = np.sort(records[:, 1])
    starts = np.arange(kill_s, until_s - window_s + 1e-9, step_s)
    if len(starts) == 0:
        return None
    completed = np.searchsorted(done, starts + window_s) - np.searchsorted(done, starts)
    offered = np.searchsorted(sent, starts + window_s) - np.searchsorted(sent, starts)
    bad = np.flatnonzero(completed < keep_up * offered)
    if len(bad) == 0:
        return 0.0
    if bad[-1] == len(starts) - 1:
        return None  # still short at the end of the run
    return float(starts[bad[-1]] + window_s - kill_s)  # the end of the last window that fell short


def overload_soak(system: FleetSystem, minutes: float) -> dict:
    host, port = _host_port(system.url)
    target = [_slow_target()]
    sustained = run(closed_loop(host, port, target, connections=24, duration_s=10.0))
    rate = sustained.throughput_rps
    light = run(open_loop(host, port, target, rate / 3, duration_s=30.0, seed=1))
    pids = [a.pid for a in _actors(system.dashboard_url, ":ingress")]
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not stop.wait(5.0):
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": _rss_mb(pids)})

    sampler = threading.Thread(target=sample, daemon=True)
    samples.append({"t_s": 0.0, "rss_mb": _rss_mb(pids)})
    sampler.start()
    heavy = run(open_loop(host, port, target, 3 * rate, duration_s=60.0 * minutes, seed=2, timeout_s=30))
    stop.set()
    sampler.join()
    samples.append({"t_s": round(60.0 * minutes, 1), "rss_mb": _rss_mb(pids)})
    first, peak = samples[0]["rss_mb"], [max(s["rss_mb"][i] for s in samples) for i in range(len(pids))]
    ratio = heavy.latency_2xx_ms["p99"] / light.latency_2xx_ms["p99"]
    return {
        "model": "slow", "sustainable_rps": rate, "light": light.to_dict(), "heavy": heavy.to_dict(),
        "p99_ratio": ratio, "refused_share": heavy.statuses.get("503", 0) / max(1, heavy.requests),
        "rss_samples": samples, "rss_growth_mb": [p - f for p, f in zip(peak, first)],
    }


def replica_kill_soak(system: FleetSystem, minutes: float, rate_rps: float, kill_every_s: float) -> dict:
    duration = 60.0 * minutes
    kills: list[dict] = []

    def kill(t_s: float) -> None:
        workers = _actors(system.dashboard_url, ":worker-fraud_split")
        if not workers:
            return
        victim = workers[len(kills) % len(workers)]
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        kills.append({"t_s": t_s, "pid": victim.pid})

    # No kill in the last 12 s: room to see the last recovery.
    records, result = _load_while(system, "fraud_split", rate_rps, duration, 3, kill_every_s, kill, quiet_end_s=12)
    for k in kills:
        k["recovery_s"] = recovery_s(records, k["t_s"], duration)
    recoveries = [k["recovery_s"] for k in kills]
    failed = failure_rate(records)
    return {
        "model": "fraud_split", "rate_rps": rate_rps, "result": result.to_dict(), "kills": kills,
        "failure_rate": failed, "failed": int(round(failed * len(records))),
        "max_recovery_s": None if not recoveries or None in recoveries else max(recoveries),
    }


def version_switch_soak(system: FleetSystem, repo: ModelRepository, minutes: float, rate_rps: float,
                        publish_every_s: float) -> dict:
    """A new version of `fraud` (the same file) published every `publish_every_s` under load: no request
    may fail across the switches, and the answers must move to the new versions."""
    duration = 60.0 * minutes
    model_file = _fraud_file(repo)
    metadata = {**repo.metadata("fraud", 1), "note": "soak: version switch"}
    published: list[dict] = []

    def publish(t_s: float) -> None:
        version = repo.publish("fraud", {"model.pt": model_file}, metadata)
        published.append({"t_s": round(t_s, 1), "version": version})

    records, result = _load_while(system, "fraud", rate_rps, duration, 4, publish_every_s, publish,
                                  quiet_end_s=publish_every_s / 2)
    failed = failure_rate(records)
    final = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{system.url}/v2/models/fraud/infer", data=_fraud_target("fraud").body,
        headers={"Content-Type": "application/json"}), timeout=30).read())["model_version"]
    return {
        "model": "fraud", "rate_rps": rate_rps, "result": result.to_dict(), "published": published,
        "failure_rate": failed, "failed": int(round(failed * len(records))),
        "served_at_end": final,
    }


def soak_goals(soak: dict) -> list[dict]:
    """The soak's promises as goals of the benchmark report (same shape as `ratios_and_goals`)."""
    goals = []
    over = soak.get("overload")
    if over:
        goals.append({"goal": "overload at 3x the sustainable rate: p99 of the accepted requests over their p99 at "
                              "a third of it", "value": round(over["p99_ratio"], 2), "target": 2, "unit": "x",
                      "met": over["p99_ratio"] <= 2, "gap": round(over["p99_ratio"] - 2, 2)})
    kill = soak.get("replica_kill")
    if kill:
        pct = 100 * kill["failure_rate"]
        goals.append({"goal": "worker replicas SIGKILLed under load: failed requests", "value": round(pct, 3),
                      "target": 0.1, "unit": "%", "met": pct <= 0.1, "gap": round(pct - 0.1, 3)})
        worst = kill["max_recovery_s"]
        goals.append({"goal": "worker replicas SIGKILLed under load: worst recovery to full throughput",
                      "value": worst, "target": 10, "unit": "s", "met": worst is not None and worst < 10,
                      "gap": None if worst is None else round(worst - 10, 1)})
    switch = soak.get("version_switch")
    if switch:
        goals.append({"goal": f"{len(switch['published'])} versions published under load: failed requests",
                      "value": switch["failed"], "target": 0, "unit": "", "met": switch["failed"] == 0,
                      "gap": switch["failed"]})
    return goals


def run_soak(system: FleetSystem, scenarios: list[str], minutes: float, rate_rps: float, kill_every_s: float,
             repo: ModelRepository | None = None) -> dict:
    """The soak scenarios against `system` (a fleet serving `build_repository`'s models from `repo`)."""
    out: dict = {"minutes": minutes}
    if "overload" in scenarios:
        print("overload soak ...", flush=True)
        out["overload"] = overload_soak(system, minutes)
    if "replica_kill" in scenarios:
        print("replica kill soak ...", flush=True)
        out["replica_kill"] = replica_kill_soak(system, minutes, rate_rps, kill_every_s)
    if "version_switch" in scenarios and repo is not None:
        print("version switch soak ...", flush=True)
        out["version_switch"] = version_switch_soak(system, repo, minutes, rate_rps, kill_every_s)
    return out


def summary_markdown(report: dict) -> str:
    lines = [f"# fleet soak, git {report['git_sha']}, {report['created_at']}", ""]
    return "\n".join(lines) + "\n" + soak_markdown(report)


def soak_markdown(report: dict) -> str:
    """The soak figures as markdown (`report` holds `overload` / `replica_kill` and `minutes`)."""
    lines = []
    over = report.get("overload")
    if over:
        lines += ["## overload (slow model)", "",
                  f"- sustainable rate {over['sustainable_rps']:.0f} req/s; soak at 3 x for {report['minutes']} min",
                  f"- p99 of the answered requests: {over['light']['latency_2xx_ms']['p99']:.0f} ms at a third, "
                  f"{over['heavy']['latency_2xx_ms']['p99']:.0f} ms at 3 x: ratio {over['p99_ratio']:.2f} (promise <= 2)",
                  f"- refused (503 + Retry-After): {100 * over['refused_share']:.0f} % of the requests; statuses "
                  f"{over['heavy']['statuses']}, transport errors {over['heavy']['errors'] or 'none'}",
                  f"- ingress memory growth over the soak: {', '.join(f'{g:.0f} MB' for g in over['rss_growth_mb'])}",
                  ""]
    kill = report.get("replica_kill")
    if kill:
        lines += ["## replica_kill (fraud_split, 2 worker replicas)", "",
                  f"- {kill['rate_rps']:.0f} req/s for {report['minutes']} min, {len(kill['kills'])} worker "
                  f"replicas SIGKILLed",
                  f"- failures: {kill['failed']} of {kill['result']['requests']} "
                  f"({100 * kill['failure_rate']:.3f} %, promise <= 0.1 %)",
                  f"- recovery per kill (s): {[None if k['recovery_s'] is None else round(k['recovery_s'], 1) for k in kill['kills']]}"
                  f" (promise < 10 s)", ""]
    switch = report.get("version_switch")
    if switch:
        lines += ["## version_switch (fraud)", "",
                  f"- {switch['rate_rps']:.0f} req/s for {report['minutes']} min, versions "
                  f"{[p['version'] for p in switch['published']]} published; serving {switch['served_at_end']} at the end",
                  f"- failures: {switch['failed']} of {switch['result']['requests']} (promise: none)", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--minutes", type=float, default=2.0, help="soak length of each scenario")
    p.add_argument("--rate", type=float, default=300.0, help="replica_kill: offered req/s")
    p.add_argument("--kill-every", type=float, default=30.0,
                   help="seconds between kills (replica_kill) and between published versions (version_switch)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(143)))
    out_dir = Path(args.out) / (datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-soak")
    repo = build_repository(Path(tempfile.mkdtemp(prefix="fleet-soak-")) / "repository")
    report: dict = {"git_sha": git_sha(), "machine": machine(), "config": vars(args),
                    "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    with FleetSystem(repo.root, label="fleet (defaults)") as system:
        report.update(run_soak(system, scenarios, args.minutes, args.rate, args.kill_every, repo))
    report["goals"] = soak_goals(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "summary.md").write_text(summary_markdown(report))
    print(f"wrote {out_dir / 'report.json'}")
    print(summary_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
