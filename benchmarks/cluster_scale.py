"""fleet beyond one node, measured over repeated trials: node loss under load, autoscaling under a load step,
and two nodes' aggregate throughput against one node's, on this machine's cores.

    python -m benchmarks.cluster_scale [--node-loss-trials 5] [--scale-trials 3] [--throughput-rounds 2]

Every cluster is started as a user does: `ray start` (benchmarks/raynodes.py: a head on 127.0.0.3, a second
node on 127.0.0.2, 2 logical CPUs each, sharing the machine's 2 cores) and `fleet up --address`, or `fleet up`
alone for autoscaling. The model is fraud (4,000 rows, 1 epoch), one row per request, JSON.

- node loss: fraud in a worker replica on each node (placement split, 2 worker replicas, an ingress per node);
  200 requests/s open loop on the head's address for 10 s; the second node SIGKILLed 3 s in (raylet, agents,
  workers). Per trial: requests, failures, the last failure's time after the kill, the slowest answer after it
  and the last request sent after it that took over 250 ms (how long the loss held serving up). The failed fraction is
  pooled over trials with its Clopper-Pearson 95 % bound (goal: <= 0.1 %, the other node serving within 2 s).
- autoscaling: `fleet up` with ingress_autoscaling 1..3, target_load 4, upscale_delay_s 1, downscale_delay_s 3,
  look_back_s 2; 24 connections closed loop (new connections every 3 s) until 3 ingress replicas run, then
  20 requests/s until 1 does; replicas counted every 0.25 s from the dashboard. Goal: 1 -> 3 in <= 15 s,
  back to 1 with no failed request.
- throughput: closed loop, 64 connections, `--seconds`: one node (an ingress replica on each of its 2 CPUs)
  against two nodes (an ingress on each, 32 connections to each node's address); ABAB rounds, each on a fresh
  cluster. Goal: two nodes >= 0.9 x one node (fleet adds no cross-node cost).

Results: benchmarks/results/cluster_scale/<stamp>.json and a printed summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.drift_calibration import clopper_pearson
from benchmarks.loadgen import closed_loop, open_loop
from benchmarks.raynodes import FRAUD_TARGET, HEAD, NODE, kill_node, load_with_fault, start_nodes
from cluster.ports import free_ports
from cluster.status import _replicas
from serving.app import INGRESS_NAME
from training.bootstrap import bootstrap

RESULTS = Path("benchmarks/results/cluster_scale")
_SLOW_S = 0.25  # a request slower than this after the kill was held up by the loss
BIN = Path(sys.executable).parent
AUTOSCALE_YAML = ("ingress_autoscaling: {min_replicas: 1, max_replicas: 3, target_load: 4, upscale_delay_s: 1, "
                  "downscale_delay_s: 3, look_back_s: 2}\n")


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _env(work: Path, config: str, **extra: str) -> dict:
    (work / "fleet.yaml").write_text(config)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLEET_CONFIG": str(work / "fleet.yaml"),
            "RAY_AUTH_MODE": "token", **extra}


def _attached(work: Path, env: dict, fleet_flags: list[str], second: bool = True):
    """Start a cluster and attach fleet; (nodes, port, flags) or raise."""
    for _ in range(3):
        gcs, dashboard, port, grpc_port = free_ports(4)
        nodes = start_nodes(work, env, gcs, dashboard, second=second)
        if nodes is None:
            continue
        flags = ["--address", nodes.address, "--host", "node", "--port", str(port), "--grpc-port", str(grpc_port),
                 "--state-dir", str(work / "state"), *fleet_flags]
        up = _run(["fleet", "up", *flags], work, env)
        if up.returncode == 0:
            return nodes, port, flags
        nodes.stop()
        if "in use" not in up.stdout + up.stderr:
            raise RuntimeError(up.stdout + up.stderr)
    raise RuntimeError("no free ports after three attempts")


def node_loss_trial(work: Path, seed: int, log=print) -> dict:
    env = _env(work, "", FLEET_PLACEMENT="split", FLEET_WORKER_REPLICAS="2")
    nodes, port, _ = _attached(work, env, ["--ingress-per-node", "1"])
    try:
        killed_at, records, result = load_with_fault(HEAD, port, lambda: kill_node(nodes.temp_dir, NODE), seed=seed)
    finally:
        nodes.stop()
    failed = (records[:, 2] != 200) | (records[:, 4] != 0)
    last = float(np.max(records[failed, 1]) - killed_at) if failed.any() else None
    after = records[(records[:, 1] >= killed_at) & ~failed]
    slow = after[after[:, 3] > _SLOW_S]
    row = {"requests": int(len(records)), "failed": int(failed.sum()), "last_failure_after_kill_s": last,
           "p99_after_kill_ms": float(np.percentile(after[:, 3], 99) * 1e3),
           "max_after_kill_ms": float(np.max(after[:, 3]) * 1e3),
           # the last request sent after the kill that took longer than _SLOW_S: when serving was back to normal
           "slow_until_s": float(np.max(slow[:, 1]) - killed_at) if len(slow) else 0.0,
           "statuses": result.statuses, "errors": result.errors}
    log(f"node loss trial {seed}: {row}")
    return row


def autoscale_trial(work: Path, seed: int, log=print) -> dict:
    env = _env(work, AUTOSCALE_YAML)
    for _ in range(3):
        port, dash, grpc_port = free_ports(3)
        flags = ["--port", str(port), "--dashboard-port", str(dash), "--grpc-port", str(grpc_port),
                 "--state-dir", str(work / "state")]
        up = _run(["fleet", "up", *flags], work, env)
        if up.returncode == 0 or "in use" not in up.stdout + up.stderr:
            break
    if up.returncode != 0:
        raise RuntimeError(up.stdout + up.stderr)
    counts: list[tuple[float, int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def watch():
        while not stop.is_set():
            counts.append((time.monotonic() - started, _replicas(f"http://127.0.0.1:{dash}")[0].get(INGRESS_NAME, 0)))
            time.sleep(0.25)

    def reached(n: int) -> bool:
        return bool(counts) and counts[-1][1] == n

    async def scenario():
        runs, k = [], 0
        while not reached(3) and time.monotonic() - started < 90:
            runs.append(await closed_loop("127.0.0.1", port, [FRAUD_TARGET], 24, 3.0, timeout_s=30, seed=seed * 100 + k))
            k += 1
        load_end = time.monotonic() - started
        while not reached(1) and time.monotonic() - started < load_end + 90:
            runs.append(await open_loop("127.0.0.1", port, [FRAUD_TARGET], 20, 1.0, seed=seed * 100 + k,
                                        max_connections=4, timeout_s=30))
            k += 1
        return runs, load_end

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        runs, load_end = asyncio.run(scenario())
    finally:
        stop.set()
        watcher.join()
        _run(["fleet", "down", *flags], work, env)
    up_at = next((t for t, n in counts if n == 3), None)
    down_at = next((t for t, n in counts if t > load_end and n == 1), None)
    row = {"to_3_replicas_s": up_at, "load_end_s": load_end,
           "back_to_1_after_load_s": None if down_at is None else down_at - load_end,
           "requests": sum(r.requests for r in runs), "ok": sum(r.statuses.get("200", 0) for r in runs),
           "errors": sum(sum(r.errors.values()) for r in runs)}
    log(f"autoscale trial {seed}: {row}")
    return row


def throughput_round(work: Path, two_nodes: bool, seconds: float, log=print) -> float:
    env = _env(work, "")
    fleet_flags = ["--ingress-per-node", "1"] if two_nodes else ["--ingress-replicas", "2"]
    nodes, port, _ = _attached(work, env, fleet_flags, second=two_nodes)
    hosts = (HEAD, NODE) if two_nodes else (HEAD,)
    try:
        async def load(duration: float):
            return await asyncio.gather(*(closed_loop(h, port, [FRAUD_TARGET], 64 // len(hosts), duration, timeout_s=30)
                                          for h in hosts))

        asyncio.run(load(3.0))  # warm-up
        results = asyncio.run(load(seconds))
    finally:
        nodes.stop()
    rate = sum(r.throughput_rps for r in results)
    log(f"throughput, {'two nodes' if two_nodes else 'one node'}: {rate:.0f} requests/s")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-loss-trials", type=int, default=5)
    parser.add_argument("--scale-trials", type=int, default=3)
    parser.add_argument("--throughput-rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="each throughput measurement")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleet-cluster-scale-"))
    bootstrap(str(work / "model_repository"), rows=4000, epochs=1, seed=1, num_threads=1, log=lambda *a, **k: None)
    out: dict = {"node_loss": [], "autoscale": [], "throughput": []}
    for k in range(args.node_loss_trials):
        out["node_loss"].append(node_loss_trial(work, k))
    for k in range(args.scale_trials):
        out["autoscale"].append(autoscale_trial(work, k))
    for k in range(args.throughput_rounds):
        one = throughput_round(work, False, args.seconds)
        two = throughput_round(work, True, args.seconds)
        out["throughput"].append({"one_node_rps": one, "two_nodes_rps": two, "ratio": two / one})
    out["summary"] = summary = _summary(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"written to {path}")
    return 0


def _summary(out: dict) -> dict:
    summary: dict = {}
    if out["node_loss"]:
        n = sum(t["requests"] for t in out["node_loss"])
        k = sum(t["failed"] for t in out["node_loss"])
        lasts = [t["last_failure_after_kill_s"] for t in out["node_loss"] if t["last_failure_after_kill_s"] is not None]
        summary["node_loss"] = {"trials": len(out["node_loss"]), "requests": n, "failed": k,
                                "failed_fraction": k / n, "failed_fraction_ci95": clopper_pearson(k, n),
                                "latest_failure_after_kill_s": max(lasts) if lasts else None,
                                "slow_until_s": [t["slow_until_s"] for t in out["node_loss"]],
                                "max_after_kill_ms": [t["max_after_kill_ms"] for t in out["node_loss"]]}
    if out["autoscale"]:
        ups = [t["to_3_replicas_s"] for t in out["autoscale"]]
        downs = [t["back_to_1_after_load_s"] for t in out["autoscale"]]
        summary["autoscale"] = {"trials": len(ups), "to_3_replicas_s": ups, "back_to_1_after_load_s": downs,
                                "requests": sum(t["requests"] for t in out["autoscale"]),
                                "failed": sum(t["requests"] - t["ok"] for t in out["autoscale"])}
    if out["throughput"]:
        ratios = [r["ratio"] for r in out["throughput"]]
        summary["throughput"] = {"rounds": len(ratios), "ratios": ratios, "mean_ratio": float(np.mean(ratios))}
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
