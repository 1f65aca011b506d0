"""An identical candidate at 50 % of peak traffic, judged by every default gate: false rollbacks at saturation.

    python -m benchmarks.aa_peak [--runs 6] [--seconds 20]

One cluster (`LocalCluster`, an admin token, no automatic retrain) serving `fr`, a copy of fraud
version 1 with stages 50, 100 % and `min_stage_requests` 10^9 (the stage never passes; the
gates are the defaults: errors, latency, outputs). A warm-up at peak (wrk, 64 connections,
one-row JSON), then an identical copy is published and rolled out at 50 %, and wrk runs
`--runs` times `--seconds` at peak; after each run the rollout's state and each gate's log
e-value, threshold, estimate (candidate / stable) and count are printed. A rollback of the
identical copy is false by construction: the benchmark prints the decision and stops. Each
invocation is one trial; the README gives the count of trials that rolled back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bodies import request_bodies
from benchmarks.live_cluster import start_cluster
from benchmarks.wrk import run_wrk
from cluster.config import FleetSettings
from serving.registry import ModelRepository
from training.bootstrap import bootstrap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aa_peak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--keep-audit", help="copy the data folder's audit records (decisions, every judge tick) here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleet-aa-peak-"))
    repo_dir = work / "repo"
    bootstrap(str(repo_dir), rows=4000, epochs=1, seed=1, num_threads=1, log=lambda *a, **k: None)
    repo = ModelRepository(str(repo_dir))
    metadata = repo.metadata("fraud", 1)
    model = (repo_dir / "fraud" / "1" / "model.pt").read_bytes()
    config = repo.config_proto("fraud")
    config.name = "fr"
    config.parameters["fleet.rollout.stages"].string_value = "50,100"
    config.parameters["fleet.rollout.min_stage_requests"].string_value = str(10**9)
    repo.publish("fr", {"model.pt": model}, metadata, config=config)
    settings = FleetSettings(repository=str(repo_dir), state_dir=str(work / "state"), data_dir=str(work / "data"),
                             version_poll_interval_s=1.0, admin_token="aa-peak-token", retrain_after_s=None)
    cluster, settings = start_cluster(settings)
    url, headers = f"{settings.url}/v2/models/fr", {"authorization": "Bearer aa-peak-token"}
    body = work / "body.json"
    body.write_bytes(request_bodies(str(repo_dir), "fr")["json"][0])
    try:
        run_wrk(f"{url}/infer", body, None, 64, 2, 3)
        repo.publish("fr", {"model.pt": model}, {**metadata, "gate": "accepted"})
        for _ in range(60):
            state = httpx.get(f"{url}/rollout", headers=headers).json()
            if state["status"] == "canary":
                break
            time.sleep(0.5)
        print(f"rollout {state['status']} at weight {state.get('weight')}", flush=True)
        for i in range(args.runs):
            result = run_wrk(f"{url}/infer", body, None, 64, 2, args.seconds)
            time.sleep(2)
            state = httpx.get(f"{url}/rollout", headers=headers).json()
            gates = (state.get("evidence") or {}).get("gates") or {}
            print(f"run {i}: {result.throughput_rps:,.0f} req/s, rollout {state['status']}; gates (log e-value, "
                  "threshold, estimate, n): " + json.dumps({g: (e.get("statistic"), e.get("threshold"),
                                                               e.get("estimate"), e.get("n")) for g, e in gates.items()}),
                  flush=True)
            if state["status"] != "canary":
                print("ended:", json.dumps(state.get("history", [])[-1:]), flush=True)
                break
    finally:
        cluster.stop()
        if args.keep_audit:
            shutil.copytree(work / "data" / "audit", args.keep_audit, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
