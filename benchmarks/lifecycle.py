"""`python -m benchmarks.lifecycle`: the monitoring loop on a live cluster, from stable traffic to a retrain's canary.

    python -m benchmarks.lifecycle             # 10-20 minutes on 2 cores (the covariate phase lasts until the canary is decided)
    python -m benchmarks.lifecycle --quick     # shorter phases, 2-row requests
    python -m benchmarks.lifecycle --out DIR

A fresh repository (`training.bootstrap`: fraud version 1 with its monitoring reference) is
served by a `LocalCluster` started in this process, with a 1 s log flush and monitor tick, a
short `retrain_after_s`, a long `retrain_cooldown_s` (one retrain) and an admin token (to read
the rollout); a trivial Ray job checks that the job server takes jobs. Seeded fraud traffic
(`training.datasets.make_fraud`) is replayed open loop at a constant rate, in three phases:
"baseline", then "covariate_shift", then "concept_shift" (the baseline's features under another
labelling rule); each phase's data starts at a known row, and the replay jumps to it. The
true labels go back to `/v2/models/fraud/feedback` a few seconds after each request
(`benchmarks.lifecycle_traffic`). Every second `/drift`, `/quality`, `/metrics` and
`/rollout` are polled and the monitor's audit files (monitor.jsonl, rollout.jsonl) are read.

The loop it shows, with no human action: the covariate shift raises drift alarms; held for
`retrain_after_s` they make the monitor submit a retrain job; the job's offline gate accepts
(or rejects) the new version; an accepted version rolls out as a canary (the model's default
`fleet.rollout: canary`, stages 1, 5, 20, 50, 100 %) judged on live traffic, and is promoted
(or rolled back). The rate is 200 requests/s so that the first stage (1 %: 2 requests/s)
gathers its 200 candidate requests in about 100 s. The covariate shift goes on (at least
`seconds`, at most `max_seconds`) until the rollout of the retrained version is decided (or the
retrain failed, or its gate rejected it), so the canary is judged on the traffic it was trained
for: a concept shift during it would bring the inputs back, away from the candidate's drift
reference, and the input gate would hold the stage. If the rollout is still undecided after the
planned phases the last one goes on (at most `tail_max_s`).

At the end of each phase, and once the rollout is decided, the labels are held back until the
monitor has joined all those sent; then the online ROC AUC of its rows window is compared with
sklearn's on the same rows read from disk (the prediction log joined with the label files, with
pyarrow), and each version's online accuracy (1 - the rows window's error rate) is kept.

Figures (`benchmarks.lifecycle_report`): each detector's delay in rows after each onset, alarms
during the stable phase, online vs offline AUC, the retrain (submitted, its job's outcome, its
gate), the rollout (each stage with its weight and time, the decision and the judge's evidence),
the closed loop in time order. Writes report.json (git SHA, plan, settings, every figure),
timeline.json (the polled snapshots and audit events), summary.md and timeline.png into --out
(default benchmarks/results/lifecycle/), and copies the PNG to benchmarks/figures/lifecycle_timeline.png.
The detectors' many-trial statistics are `python -m benchmarks.drift_trials`' (in-process), the
judge's `python -m benchmarks.judge_trials` and, on a cluster, `python -m benchmarks.rollout_trials`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lifecycle_report import auc_checks, closed_loop, detector_delays, lifecycle_goals, \
    lifecycle_markdown, rollout_of, stable_false_alarms, window_auc
from benchmarks.lifecycle_traffic import Labeler, Poller, Sender
from benchmarks.live_cluster import start_cluster
from benchmarks.report import git_sha, machine

__all__ = ["PLANS", "run_lifecycle", "main"]

MODEL = "fraud"
RESULTS = Path("benchmarks/results/lifecycle")
FIGURE = Path("benchmarks/figures/lifecycle_timeline.png")
# 200 requests/s: the rollout goal's rate (a good version from 1 % to 100 % within 5 minutes); 5 rows each keeps
# the 1,000 rows/s the detectors' figures were measured at. The covariate shift lasts until the retrained version's
# rollout is decided (`until_decided`: at least `seconds`, at most `max_seconds`): the alarm, retrain_after_s, the
# job (1 to 4 minutes, by the machine's load) and the canary (~2.5 minutes) all happen on the traffic the retrain
# was for. (A concept shift during the canary moves the inputs away from the candidate's reference: its drift
# alarm then holds the stage.)
PLANS = {
    "full": {"rate_rps": 200.0, "rows_per_request": 5, "label_delay_s": 5.0, "retrain_after_s": 30.0,
             "tail_max_s": 300.0, "phases": [{"scenario": "baseline", "seconds": 120.0},
                                             {"scenario": "covariate_shift", "seconds": 180.0, "max_seconds": 720.0,
                                              "until_decided": True},
                                             {"scenario": "concept_shift", "seconds": 180.0}]},
    "quick": {"rate_rps": 200.0, "rows_per_request": 2, "label_delay_s": 3.0, "retrain_after_s": 15.0,
              "tail_max_s": 180.0, "phases": [{"scenario": "baseline", "seconds": 40.0},
                                              {"scenario": "covariate_shift", "seconds": 60.0, "max_seconds": 480.0,
                                               "until_decided": True},
                                              {"scenario": "concept_shift", "seconds": 60.0}]},
}
COMMON = {"seed": 7, "bootstrap_rows": 20_000, "bootstrap_epochs": 5, "drift_window_s": 60.0,
          "retrain_cooldown_s": 6 * 3600.0, "retrain_args": "--epochs 3"}


def replay_rows(plan: dict) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The replay's data (x, y) and the row each phase's data starts at: each phase's rows from its own seed, as
    many as its longest (`max_seconds`) at the plan's rate; the last phase has `tail_max_s` more. (The replay
    jumps to a phase's first row when the phase begins: `Sender.jump`.)"""
    rows_per_s = plan["rate_rps"] * plan["rows_per_request"]
    xs, ys, starts, start = [], [], [], 0
    from training.datasets import make_fraud

    for k, phase in enumerate(plan["phases"]):
        seconds = phase.get("max_seconds", phase["seconds"]) + (plan["tail_max_s"] if k == len(plan["phases"]) - 1
                                                                else 0.0)
        rows = int(round(rows_per_s * seconds)) // plan["rows_per_request"] * plan["rows_per_request"]
        x, y = make_fraud(rows, seed=plan["seed"] * 100 + k, scenario=phase["scenario"])
        starts.append(start)
        xs.append(x)
        ys.append(y)
        start += rows
    return np.concatenate(xs), np.concatenate(ys), starts


def build_repository(folder: Path, plan: dict):
    """fraud version 1 (bootstrap), its config telling the monitor's retrain `retrain_args` and its rollout that
    labels come back (`fleet.rollout.labels`: the accuracy gate decides, not the output distribution)."""
    from serving.registry import ModelRepository
    from training.bootstrap import bootstrap

    bootstrap(str(folder), rows=plan["bootstrap_rows"], epochs=plan["bootstrap_epochs"], seed=plan["seed"],
              log=lambda line: None)
    repo = ModelRepository(str(folder))
    config = repo.config_proto(MODEL)
    config.parameters["fleet.retrain.args"].string_value = plan["retrain_args"]
    config.parameters["fleet.rollout.labels"].string_value = "true"
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
        error_rate = online.get("label_error_rate")
        versions[version] = {"online": online.get("roc_auc"), "offline": off.get("roc_auc"),
                             "rows_online": online.get("rows"), "rows_offline": off.get("rows"), "diff": diff,
                             "accuracy": None if error_rate is None else round(1.0 - error_rate, 6)}
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
            published = Path(repo.version(MODEL, version).path, "model.pt").stat().st_mtime
            out.update(new_version=version, gate=metadata.get("gate"), gate_reason=metadata.get("gate_reason"),
                       gate_holdout=metadata.get("gate_holdout"), served_t=sender.first_seen.get(version),
                       published_t=round(published - sender.t0, 2))
    return out


def wait_for_job_server(dashboard_url: str, timeout_s: float = 180.0, log=print) -> float:
    """Submit a trivial job (no working_dir) and wait for it to succeed: the node's job agent is up before the
    load starts. (The monitor's retrain submission, tried a few times over ~20 s, meets "No available agent"
    while the agent is still starting on a loaded machine, and then waits out `retrain_cooldown_s`.)"""
    from cluster.jobs import auth_env, submit

    auth_env()
    from ray.job_submission import JobSubmissionClient

    started = time.time()
    deadline = started + timeout_s
    client = JobSubmissionClient(dashboard_url)
    job = None
    while job is None:
        try:
            job = submit(client, entrypoint="python -c pass", metadata={"fleet.trigger": "benchmark readiness"})
        except RuntimeError as exc:
            if time.time() > deadline:
                raise
            log(f"  the job server is not ready yet ({exc}); trying again")
            time.sleep(5.0)
    while str(client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.time() > deadline:
            raise RuntimeError(f"the readiness job {job} did not end within {timeout_s:.0f} s")
        time.sleep(1.0)
    return time.time() - started


def _loop_ended(poller: Poller, repo, sender: Sender) -> bool:
    """The retrain failed, its gate rejected it, or its version's rollout was decided."""
    r = _retrain(poller.events, repo, sender)
    if r.get("status") is not None and (r["status"] != "SUCCEEDED" or r.get("gate") == "rejected"):
        return True
    decided = _decision(poller)
    return decided is not None and r.get("new_version") is not None and decided.get("version") == r["new_version"]


def _phase_text(phase: dict) -> str:
    if phase.get("until_decided"):
        return f"{phase['scenario']} {phase['seconds']:g}-{phase['max_seconds']:g} s (until the rollout is decided)"
    return f"{phase['scenario']} {phase['seconds']:g} s"


def _decision(poller: Poller) -> dict | None:
    """The first promote, rollback or abort in the rollout history after the load started."""
    return next((h for h in poller.rollout_history if h["t"] >= 0 and h.get("event") in ("promote", "rollback",
                                                                                        "abort")), None)


def _settle(sender: Sender, poller: Poller, repo, planned_s: float, tail_max_s: float, on_decision,
            log=print) -> str:
    """Keep the last phase going until the retrained version's rollout is decided (promoted or rolled back),
    the retrain failed or its gate rejected it; `on_decision()` runs once the decision is seen."""
    while time.time() - sender.t0 < planned_s + tail_max_s:
        r = _retrain(poller.events, repo, sender)
        now = time.time() - sender.t0
        if not r["submitted"] and now >= planned_s:
            return "no retrain submitted"
        if r.get("status") is not None:
            if r.get("status") != "SUCCEEDED" or r.get("gate") == "rejected":
                if now >= planned_s:
                    return f"retrain ended: {r.get('status')}, gate {r.get('gate')}"
            elif (decided := _decision(poller)) is not None and decided.get("version") == r.get("new_version"):
                on_decision(decided)
                if now >= max(planned_s, decided["t"] + 15):
                    return f"rollout of version {decided['version']} decided: {decided['event']} at {decided['t']:.0f} s"
        time.sleep(1.0)
    return "tail_max_s reached"


def run_lifecycle(plan: dict, out_dir: Path, log=print) -> dict:
    """Run the scenario (module doc); write its files into `out_dir`; return the report."""
    from cluster.config import FleetSettings

    work = Path(tempfile.mkdtemp(prefix="fleet-lifecycle-"))
    log(f"lifecycle: training fraud version 1 into {work / 'repository'} ...")
    repo = build_repository(work / "repository", plan)
    output = repo.spec(MODEL).outputs[0].name
    x, y, starts = replay_rows(plan)
    from serving.rollout.config import RolloutConfig

    rollout_config = RolloutConfig.from_parameters(
        {k: v.string_value for k, v in repo.config_proto(MODEL).parameters.items()}).to_dict()
    admin_token = secrets.token_urlsafe(16)
    settings = FleetSettings(
        repository=str(work / "repository"), data_dir=str(work / "data"), state_dir=str(work / "state"),
        train_storage=str(work / "train"), log_flush_interval_s=1.0, monitor_interval_s=1.0,
        retrain_after_s=plan["retrain_after_s"], retrain_cooldown_s=plan["retrain_cooldown_s"],
        drift_window_s=plan["drift_window_s"], admin_token=admin_token)
    log("lifecycle: starting the cluster ...")
    cluster, settings = start_cluster(settings, log=log)
    try:
        log(f"lifecycle: the job server answered a trivial job in {wait_for_job_server(settings.dashboard_url, log=log):.0f} s")
    except BaseException:
        cluster.stop()
        raise
    rows_per_s = plan["rate_rps"] * plan["rows_per_request"]
    sender = Sender(settings.url, MODEL, x, plan["rows_per_request"], plan["rate_rps"])
    labeler = Labeler(sender, y, MODEL, plan["label_delay_s"])
    poller = Poller(settings.url, MODEL, settings.data_dir, sender, admin_token=admin_token)
    window = settings.quality_window_labels
    checkpoints, ended_because = [], ""
    decided: list[dict] = []

    def on_decision(event: dict) -> None:
        """Once: compare the versions right after the rollout's decision (the before and after of the canary)."""
        if not decided:
            decided.append(event)
            checkpoints.append(checkpoint(f"after the {event['event']} of v{event['version']}", labeler, poller,
                                          settings.data_dir, output, window, log))
    try:
        t0 = time.time() + 1.0
        sender.start(t0)
        labeler.start()
        poller.start()
        log(f"lifecycle: {plan['rate_rps']:g} req/s x {plan['rows_per_request']} rows = {rows_per_s:,.0f} rows/s; "
            + ", ".join(_phase_text(p) for p in plan["phases"]))
        phase_ends = []
        for index, phase in enumerate(plan["phases"]):
            if index:
                sender.jump(starts[index])
            began = time.time()
            shortest, longest = phase["seconds"], phase.get("max_seconds", phase["seconds"])
            name = f"end of {phase['scenario']}"
            while time.time() - began < longest:
                if not decided and (event := _decision(poller)) is not None:
                    log(f"  rollout: {event['event']} of version {event.get('version')} at {event['t']:.0f} s")
                    if phase.get("until_decided") and time.time() - began >= shortest:
                        decided.append(event)  # the end-of-phase checkpoint below is the one after the decision
                        name += f", after the {event['event']} of v{event['version']}"
                    else:
                        on_decision(event)
                if time.time() - began >= shortest and (not phase.get("until_decided")
                                                        or _loop_ended(poller, repo, sender)):
                    break
                time.sleep(0.5)
            phase_ends.append(round(time.time() - t0, 1))
            log(f"  {phase['scenario']} done at {time.time() - t0:.0f} s: {sender.rows_sent():,} rows sent")
            checkpoints.append(checkpoint(name, labeler, poller, settings.data_dir, output, window, log))
        planned_s = time.time() - t0
        ended_because = _settle(sender, poller, repo, planned_s, plan["tail_max_s"], on_decision, log)
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
    onsets = []
    for phase, start in zip(plan["phases"][1:], starts[1:]):
        first = sender.first_request_from(start)
        if first is not None:
            onsets.append({"name": phase["scenario"], "row": first * plan["rows_per_request"],
                           "t": round(float(sender.send_s[first]), 2)})
    stable_t = onsets[0]["t"]
    report = {
        "git_sha": git_sha(), "machine": machine(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "plan": plan, "settings": {k: v for k, v in settings.model_dump().items()
                                   if k not in ("api_keys", "admin_token")},
        "ended_because": ended_because, "phase_ends_t": phase_ends, "onsets": onsets, "stable_rows": onsets[0]["row"],
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
        "rollout_config": rollout_config,
        "rollout_history": poller.rollout_history,
        "rollout_decisions": poller.rollout_events,
        "versions_first_answered_t": {str(v): round(t, 1) for v, t in sorted(sender.first_seen.items())},
        "final_drift_alarming": {v: d.get("alarming") for v, d in ((final_drift or {}).get("versions") or {}).items()},
        "final_labels": (final_quality or {}).get("labels"),
        "last_metrics": next((s["metrics"] for s in reversed(poller.timeline) if "metrics" in s), None),
    }
    new_version = report["retrain"].get("new_version")
    report["rollout"] = None if new_version is None else rollout_of(poller.rollout_history, poller.rollout_events,
                                                                    new_version)
    report["answers_by_version"] = answers_by_version(sender)
    report["closed_loop"] = closed_loop(report)
    report["goals"] = lifecycle_goals(report)
    write_files(out_dir, report, {"timeline": poller.timeline, "events": poller.events, "label_posts": labeler.posts,
                                  "onsets": onsets, "rollout_decisions": poller.rollout_events})
    shutil.rmtree(work, ignore_errors=True)
    return report


def answers_by_version(sender: Sender, bin_s: float = 5.0) -> dict:
    """Per `bin_s` of send time: the requests answered 200 by each version ({"bin_s", "t": [...], "<v>": [...]})."""
    n = sender.scheduled
    ok = sender.status[:n] == 200
    bins = (sender.send_s[:n][ok] // bin_s).astype(np.int64)
    versions = sender.version[:n][ok]
    size = int(bins.max()) + 1 if len(bins) else 0
    out: dict = {"bin_s": bin_s, "t": [round(i * bin_s, 1) for i in range(size)]}
    for v in np.unique(versions):
        out[str(int(v))] = np.bincount(bins[versions == v], minlength=size).tolist()
    return out


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
        report["closed_loop"] = closed_loop(report)
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
