"""`python -m benchmarks.lifecycle`: the monitoring loop on a live cluster, from stable traffic to a served retrain.

    python -m benchmarks.lifecycle             # about 12 minutes on 2 cores
    python -m benchmarks.lifecycle --quick     # about 6 minutes
    python -m benchmarks.lifecycle --out DIR

A fresh repository (`training.bootstrap`: fraud version 1 with its monitoring reference) is
served by a `LocalCluster` started in this process, with a 1 s log flush and monitor tick, a
short `retrain_after_s` and a long `retrain_cooldown_s` (one retrain). Seeded fraud traffic
(`training.datasets.make_fraud`) is replayed open loop at a constant rate, in three phases:
"baseline", then "covariate_shift" from a known row, then "concept_shift" (the baseline's
features under another labelling rule) from a second one. The true labels go back to
`/v2/models/fraud/feedback` a few seconds after each request (`benchmarks.lifecycle_traffic`).
Every second `/drift`, `/quality` and `/metrics` are polled and the monitor's audit file is read.
After the planned phases the last one goes on (at most `tail_max_s`) until the retrain the
monitor submitted has ended and, if its gate accepted it, answered requests.

At the end of each phase the labels are held back until the monitor has joined all those sent;
then the online ROC AUC of its rows window is compared with sklearn's on the same rows read
from disk (the prediction log joined with the label files, with pyarrow).

Figures (`benchmarks.lifecycle_report`): each detector's delay in rows after each onset, alarms
during the stable phase, online vs offline AUC, the retrain (submitted, its job's outcome, its
version served). Writes report.json (git SHA, plan, settings, every figure), timeline.json (the
polled snapshots and audit events), summary.md and timeline.png into --out (default
benchmarks/results/lifecycle/), and copies the PNG to benchmarks/figures/lifecycle_timeline.png.
The detectors' many-trial statistics are `python -m benchmarks.drift_trials`' (in-process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lifecycle_report import auc_checks, detector_delays, lifecycle_goals, lifecycle_markdown, \
    stable_false_alarms, window_auc
from benchmarks.lifecycle_traffic import Labeler, Poller, Sender
from benchmarks.live_cluster import start_cluster
from benchmarks.report import git_sha, machine

__all__ = ["PLANS", "run_lifecycle", "main"]

MODEL = "fraud"
RESULTS = Path("benchmarks/results/lifecycle")
FIGURE = Path("benchmarks/figures/lifecycle_timeline.png")
PLANS = {
    "full": {"rate_rps": 100.0, "rows_per_request": 10, "label_delay_s": 5.0, "retrain_after_s": 30.0,
             "tail_max_s": 300.0, "phases": [{"scenario": "baseline", "seconds": 120.0},
                                             {"scenario": "covariate_shift", "seconds": 180.0},
                                             {"scenario": "concept_shift", "seconds": 180.0}]},
    "quick": {"rate_rps": 50.0, "rows_per_request": 10, "label_delay_s": 3.0, "retrain_after_s": 15.0,
              "tail_max_s": 180.0, "phases": [{"scenario": "baseline", "seconds": 40.0},
                                              {"scenario": "covariate_shift", "seconds": 60.0},
                                              {"scenario": "concept_shift", "seconds": 60.0}]},
}
COMMON = {"seed": 7, "bootstrap_rows": 20_000, "bootstrap_epochs": 5, "drift_window_s": 60.0,
          "retrain_cooldown_s": 6 * 3600.0, "retrain_args": "--epochs 3"}


def replay_rows(plan: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The replay's rows (x, y) and its onsets ({"name", "row"}): each phase's rows from its own seed; the last
    phase has `tail_max_s` more."""
    rows_per_s = plan["rate_rps"] * plan["rows_per_request"]
    xs, ys, onsets, start = [], [], [], 0
    from training.datasets import make_fraud

    for k, phase in enumerate(plan["phases"]):
        seconds = phase["seconds"] + (plan["tail_max_s"] if k == len(plan["phases"]) - 1 else 0.0)
        x, y = make_fraud(int(round(rows_per_s * seconds)), seed=plan["seed"] * 100 + k, scenario=phase["scenario"])
        if k:
            onsets.append({"name": phase["scenario"], "row": start})
        xs.append(x)
        ys.append(y)
        start += int(round(rows_per_s * phase["seconds"]))
    return np.concatenate(xs), np.concatenate(ys), onsets


def build_repository(folder: Path, plan: dict):
    """fraud version 1 (bootstrap), its config telling the monitor's retrain `retrain_args`."""
    from serving.registry import ModelRepository
    from training.bootstrap import bootstrap

    bootstrap(str(folder), rows=plan["bootstrap_rows"], epochs=plan["bootstrap_epochs"], seed=plan["seed"],
              log=lambda line: None)
    repo = ModelRepository(str(folder))
    config = repo.config_proto(MODEL)
    config.parameters["fleet.retrain.args"].string_value = plan["retrain_args"]
    repo.write_config(MODEL, config)
    if not repo.metadata(MODEL, 1).get("monitoring"):
        raise RuntimeError("fraud version 1 has no monitoring reference in its metadata.json")
    return repo


def offline_aucs(data_dir: str, output: str, window: int) -> dict:
    """Per version: `window_auc` of the prediction log joined with the label files (pyarrow, as a user would)."""
    import pyarrow.dataset as ds

    log = ds.dataset(f"{data_dir}/traffic/{MODEL}", format="parquet", partitioning="hive").to_table(
        columns=["request_id", "row", "timestamp", output, "version"])
    labels = ds.dataset(f"{data_dir}/labels/{MODEL}", format="parquet", partitioning="hive").to_table(
        columns=["request_id", "row", "label", "received_at"])
    joined = labels.join(log, keys=["request_id", "row"], join_type="inner")
    versions = joined["version"].to_numpy()
    out = {}
    for version in np.unique(versions):
        part = joined.filter(joined["version"] == version)
        out[str(int(version))] = window_auc(part["received_at"].cast("int64").to_numpy(),
                                            part["timestamp"].cast("int64").to_numpy(), part["label"].to_numpy(),
                                            part[output].to_numpy(), window)
    return out


def checkpoint(name: str, labeler: Labeler, poller: Poller, data_dir: str, output: str, window: int,
               log=print, timeout_s: float = 90.0) -> dict:
    """Hold the labels back until the monitor joined every one sent, then compare online and offline AUCs."""
    labeler.pause()
    try:
        posted = labeler.posted_labels
        deadline = time.time() + timeout_s
        quality = None
        while time.time() < deadline:
            quality = poller.http.get_json(f"/v2/models/{MODEL}/quality")
            labels = (quality or {}).get("labels") or {}
            if labels.get("joined", 0) >= posted and labels.get("pending", 1) == 0:
                break
            time.sleep(0.5)
        t = time.time() - labeler.sender.t0
        offline = offline_aucs(data_dir, output, window)
    finally:
        labeler.resume()
    labels = (quality or {}).get("labels") or {}
    versions = {}
    for version, doc in ((quality or {}).get("versions") or {}).items():
        online = (doc.get("rows") or {})
        off = offline.get(version, {})
        diff = None
        if online.get("roc_auc") is not None and off.get("roc_auc") is not None:
            diff = round(abs(online["roc_auc"] - off["roc_auc"]), 6)
        versions[version] = {"online": online.get("roc_auc"), "offline": off.get("roc_auc"),
                             "rows_online": online.get("rows"), "rows_offline": off.get("rows"), "diff": diff}
    result = {"name": name, "t": round(t, 1), "labels_posted": posted, "labels_joined": labels.get("joined"),
              "labels_pending": labels.get("pending"), "versions": versions}
    log(f"  checkpoint {name} at {t:.0f} s: {posted:,} labels posted, {labels.get('joined')} joined; "
        + ", ".join(f"v{v}: online {d['online']} offline {d['offline']} ({d['rows_online']} rows)"
                    for v, d in versions.items()))
    return result


def _retrain(events: list[dict], repo, sender: Sender) -> dict:
    submitted = next((e for e in events if e.get("event") == "retrain_submitted"), None)
    if submitted is None:
        failed = next((e for e in events if e.get("event") == "retrain_submit_failed"), None)
        return {"submitted": False, "submit_error": failed and failed.get("error")}
    ended = next((e for e in events if e.get("event") in ("retrain_succeeded", "retrain_failed")), None)
    out = {"submitted": True, "submitted_t": submitted["t"], "job": submitted.get("job"),
           "entrypoint": submitted.get("entrypoint"), "version": submitted.get("version"),
           "held_s": submitted.get("held_s"), "status": ended and ended.get("status"),
           "ended_t": ended and ended["t"], "duration_s": ended and ended.get("duration_s")}
    newer = [v for v in repo.list_versions(MODEL) if v > (submitted.get("version") or 1)]
    for version in newer:
        metadata = repo.metadata(MODEL, version)
        if (metadata.get("ray_job") or {}).get("submission_id") == submitted.get("job"):
            out.update(new_version=version, gate=metadata.get("gate"), gate_reason=metadata.get("gate_reason"),
                       gate_holdout=metadata.get("gate_holdout"), served_t=sender.first_seen.get(version))
    return out


def _settle(sender: Sender, poller: Poller, repo, planned_s: float, tail_max_s: float, log=print) -> str:
    """Keep the last phase going until the retrain has ended and its version answered (or it was rejected)."""
    while time.time() - sender.t0 < planned_s + tail_max_s:
        r = _retrain(poller.events, repo, sender)
        if not r["submitted"] and time.time() - sender.t0 >= planned_s:
            return "no retrain submitted"
        if r.get("status") is not None:
            if r.get("status") != "SUCCEEDED" or r.get("gate") == "rejected":
                return f"retrain ended: {r.get('status')}, gate {r.get('gate')}"
            if r.get("served_t") is not None and time.time() - sender.t0 >= max(planned_s, r["served_t"] + 15):
                return f"retrained version {r.get('new_version')} answering"
        time.sleep(1.0)
    return "tail_max_s reached"


def run_lifecycle(plan: dict, out_dir: Path, log=print) -> dict:
    """Run the scenario (module doc); write its files into `out_dir`; return the report."""
    from cluster.config import FleetSettings

    work = Path(tempfile.mkdtemp(prefix="fleet-lifecycle-"))
    log(f"lifecycle: training fraud version 1 into {work / 'repository'} ...")
    repo = build_repository(work / "repository", plan)
    output = repo.spec(MODEL).outputs[0].name
    x, y, onsets = replay_rows(plan)
    settings = FleetSettings(
        repository=str(work / "repository"), data_dir=str(work / "data"), state_dir=str(work / "state"),
        train_storage=str(work / "train"), log_flush_interval_s=1.0, monitor_interval_s=1.0,
        retrain_after_s=plan["retrain_after_s"], retrain_cooldown_s=plan["retrain_cooldown_s"],
        drift_window_s=plan["drift_window_s"])
    log("lifecycle: starting the cluster ...")
    cluster, settings = start_cluster(settings, log=log)
    rows_per_s = plan["rate_rps"] * plan["rows_per_request"]
    planned_s = sum(p["seconds"] for p in plan["phases"])
    sender = Sender(settings.url, MODEL, x, plan["rows_per_request"], plan["rate_rps"])
    labeler = Labeler(sender, y, MODEL, plan["label_delay_s"])
    poller = Poller(settings.url, MODEL, settings.data_dir, sender)
    window = settings.quality_window_labels
    checkpoints, ended_because = [], ""
    try:
        t0 = time.time() + 1.0
        sender.start(t0)
        labeler.start()
        poller.start()
        log(f"lifecycle: {plan['rate_rps']:g} req/s x {plan['rows_per_request']} rows = {rows_per_s:,.0f} rows/s; "
            + ", ".join(f"{p['scenario']} {p['seconds']:g} s" for p in plan["phases"]))
        phase_end = 0.0
        for phase in plan["phases"]:
            phase_end += phase["seconds"]
            while time.time() - t0 < phase_end:
                time.sleep(0.5)
            log(f"  {phase['scenario']} done at {time.time() - t0:.0f} s: {sender.rows_sent():,} rows sent")
            checkpoints.append(checkpoint(f"end of {phase['scenario']}", labeler, poller, settings.data_dir,
                                          output, window, log))
        ended_because = _settle(sender, poller, repo, planned_s, plan["tail_max_s"], log)
        log(f"lifecycle: stopping the load at {time.time() - t0:.0f} s ({ended_because})")
        sender.stop()
        labeler.post(float("inf"))  # every answered request's labels, whatever their delay
        time.sleep(3.0)
        checkpoints.append(checkpoint("final", labeler, poller, settings.data_dir, output, window, log))
        labeler.stop()
        time.sleep(2.0)
        poller.snapshot()
        final_drift = poller.http.get_json(f"/v2/models/{MODEL}/drift")
        final_quality = poller.http.get_json(f"/v2/models/{MODEL}/quality")
        poller.stop()
    finally:
        sender.stop()
        labeler.stop()
        poller.stop()
        cluster.stop()
    for onset in onsets:
        onset["t"] = onset["row"] / rows_per_s
    stable_t = onsets[0]["t"]
    report = {
        "git_sha": git_sha(), "machine": machine(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "plan": plan, "settings": {k: v for k, v in settings.model_dump().items()
                                   if k not in ("api_keys", "admin_token")},
        "ended_because": ended_because, "onsets": onsets, "stable_rows": onsets[0]["row"],
        "rows_sent": sender.rows_sent(), "rows_answered": sender.answered_rows(),
        "statuses": {str(s): int(n) for s, n in zip(*np.unique(sender.status[:sender.scheduled],
                                                                return_counts=True))},
        "latency_ms": {q: round(float(np.nanpercentile(sender.latency_s[:sender.scheduled], p)) * 1e3, 2)
                       for q, p in (("p50", 50), ("p99", 99), ("max", 100))},
        "labels_posted": labeler.posted_labels,
        "stable_false_alarms": stable_false_alarms(poller.events, stable_t),
        "delays": detector_delays(poller.events, onsets, sender.send_s, plan["rows_per_request"]),
        "auc_checkpoints": checkpoints, "auc": auc_checks(checkpoints),
        "retrain": _retrain(poller.events, repo, sender),
        "versions_first_answered_t": {str(v): round(t, 1) for v, t in sorted(sender.first_seen.items())},
        "final_drift_alarming": {v: d.get("alarming") for v, d in ((final_drift or {}).get("versions") or {}).items()},
        "final_labels": (final_quality or {}).get("labels"),
        "last_metrics": next((s["metrics"] for s in reversed(poller.timeline) if "metrics" in s), None),
    }
    report["goals"] = lifecycle_goals(report)
    write_files(out_dir, report, {"timeline": poller.timeline, "events": poller.events, "label_posts": labeler.posts,
                                  "onsets": onsets})
    shutil.rmtree(work, ignore_errors=True)
    return report


def write_files(out_dir: Path, report: dict, timeline: dict) -> list[Path]:
    from benchmarks.lifecycle_plot import plot_timeline

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "timeline.json", out_dir / "summary.md", out_dir / "timeline.png"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(json.dumps({**timeline, "plan": report["plan"]}, default=str))  # (--render reads both)
    paths[2].write_text(lifecycle_markdown(report))
    plot_timeline(timeline, report, paths[3])
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths[3], FIGURE)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lifecycle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter phases at half the rate")
    p.add_argument("--out", default=str(RESULTS), help="folder of report.json, summary.md, timeline.png")
    p.add_argument("--seed", type=int, default=COMMON["seed"])
    p.add_argument("--render", action="store_true",
                   help="no run: redraw summary.md, the goals and timeline.png from --out's report.json and timeline.json")
    args = p.parse_args(argv)
    if args.render:
        out = Path(args.out)
        report = json.loads((out / "report.json").read_text())
        report["goals"] = lifecycle_goals(report)
        write_files(out, report, json.loads((out / "timeline.json").read_text()))
        print(lifecycle_markdown(report))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the cluster is stopped on the way out
    plan = {**COMMON, **PLANS["quick" if args.quick else "full"], "seed": args.seed,
            "mode": "quick" if args.quick else "full"}
    report = run_lifecycle(plan, Path(args.out))
    print(lifecycle_markdown(report))
    print(f"wrote {args.out}/report.json, summary.md, timeline.png and {FIGURE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
