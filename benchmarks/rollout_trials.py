"""`python -m benchmarks.rollout_trials`: progressive delivery end to end, on one live cluster.

    python -m benchmarks.rollout_trials                          # 30 trials per type, at most --budget-minutes
    python -m benchmarks.rollout_trials --trials 10              # fewer
    python -m benchmarks.rollout_trials --quick                  # 3 per type, short probes (about 10 minutes)
    python -m benchmarks.rollout_trials --render                 # redraw summary.md and the figure from report.json

One `LocalCluster` for the whole run (default settings but an admin token, a 1 s version poll so a
new candidate is loaded within a second or two, and no automatic retrain). Its repository holds
fraud version 1 (`training.bootstrap`) and copies of it under other names, made before the start
(a cluster serves the models it found when it started):

- lanes: `fraud_aa<i>` (A/A lanes: the default rollout, stages 1, 5, 20, 50, 100 %) and
  `fraud_f<i>` (fault lanes: stages 5, 100 % and `min_stage_requests` 10^9, so a candidate is
  never promoted: it is rolled back by the judge or, at its type's horizon in canary requests,
  aborted by this benchmark and counted as held). Each lane model gets its own steady open-loop
  load, `--rate` single-row requests/s with distinct ids (aiohttp, one event loop), for the
  whole run. A trial publishes one candidate version into its lane (`rollout_faults.wrap` of
  version 1's file, metadata of version 1, gate accepted), which the controller starts as a
  canary; the benchmark polls `GET /rollout` until the rollout ends. Trials of a lane run one
  after the other, each a rollout of its own (fresh judge, own rollout id), against version 1
  as stable (fault lanes) or an identical copy (A/A lanes, after each promotion);
- `fraud_route5`, `fraud_route50` and `fraud_wide50`: stages 5 or 50, 100 % (never passing; only the errors gate,
  so the judge does not end a probe for the latency of saturation): peak throughput by wrk (closed loop, 64
  connections, a one-row JSON body without id, so the split is by a fresh request id) with no
  rollout and with a rollout at 5 % (or 50 %) to an identical candidate, ABAB, before the trials, with
  the rows per model execution of each phase (from `/metrics`). `fraud_wide50` serves a model whose rows cost
  more than its executions (`rollout_probes.wide_model_file`: two hidden layers of 1,024, with fraud's
  inputs and preprocessing), so the cost of splitting the traffic shows apart from a small model's;
- `fraud_shadow`: `fleet.rollout: shadow` (share 1.0, never passing): client latency at a fixed
  open-loop rate with no rollout and while every request is copied to an identical candidate,
  ABBA, and every answer's `model_version` checked against the stable version's. Then wrk at
  peak on the same model in shadow mode until 10^6 answers, every answer's `model_version`
  counted: a shadow answer reaching a client would show as a version other than stable's
  (`benchmarks.rollout_probes`).

Trial types: A/A (identical copy), Crash, FailShare(0.05), Slow calibrated so that the
candidate's mean server latency is 1.5x stable's at the lanes' load (a first count from stable's
mean latency in `/metrics` and the loop's speed in this process before any load, then rescaled
twice by what a probe candidate on a fault lane measured, a few seconds each, aborted),
ChangeOutputs(0.10). (One model per trial would need every trial's model in the repository when
the cluster starts, each loaded in every ingress replica: lanes of successive versions instead;
each trial is still a rollout of its own, against the same stable file.)
Per trial: the decision (rollback, promote, or held at the horizon), the canary requests the
controller had judged at a rollback (the audit record's `arms`), the gates that rejected, the
client's non-200 answers and answers by the candidate in the trial's window, and the exposure
(the candidate version's requests in `/metrics` after its stragglers). Fault lanes share one
queue of trial types in round robin, A/A lanes another; no trial starts after --budget-minutes.

Writes report.json (git SHA, machine, settings, every trial), summary.md and delays.png into
--out (default benchmarks/results/rollout_trials/). The judge alone on simulated traffic is
`python -m benchmarks.judge_trials`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.live_cluster import metric_sum, start_cluster
from benchmarks.rollout_live import Admin, Stream, mean_latency, request_rows, version_counts
from benchmarks.rollout_probes import leak_probe, routing_probe, shadow_probe, wide_model_file
from benchmarks.report import git_sha, machine
from benchmarks.rollout_trials_report import goals, markdown, plot_delays, summarise

__all__ = ["TrialType", "TYPES", "main"]

RESULTS = Path("benchmarks/results/rollout_trials")
BASE = "fraud"
NEVER = 10**9  # min_stage_requests of a lane whose stage must never pass
FAULT_STAGES = "5,100"
WIDE = "fraud_wide50"  # the routing probe's compute-bound model (`wide_model_file`), at 50 %
AA_MAX_S = 600.0  # an A/A rollout not decided by then is aborted (held)


@dataclass(frozen=True)
class TrialType:
    """A candidate's fault (a `benchmarks.rollout_faults` class and its arguments), its goal (p95 of canary
    requests to rollback; None for A/A) and horizon (canary requests after which a fault lane aborts it)."""

    name: str
    title: str
    fault: str | None
    args: tuple = ()
    goal: int | None = None
    horizon: int | None = None
    lane: str = "fault"


TYPES = (
    TrialType("aa", "A/A: an identical copy", None, lane="aa"),
    TrialType("crash", "crash on every request", "Crash", (), 20, 200),
    TrialType("errors_5pct", "5 % of requests fail", "FailShareOnTraffic", (0.05,), 300, 900),
    TrialType("latency_1.5x", "every request 1.5x slower", "Slow", (), 500, 1500),
    TrialType("outputs_10pct", "10 % of outputs changed", "ChangeOutputs", (0.10,), 1500, 3000),
)


class FailShareOnTraffic(torch.nn.Module):
    """`rollout_faults.FailShare` that lets the load's warm-up pass (a batch of zeros, as `Crash` does): a version
    that loads and then fails `share` of its batches. (FailShare fails the warm-up batches too, each with
    probability `share`, and such a version is rolled back as "failed to load" before any traffic.)"""

    def __init__(self, inner: torch.nn.Module, share: float):
        super().__init__()
        self.inner = inner
        self.share = share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0.0).any()) and float(torch.rand(1)) < self.share:
            raise RuntimeError("injected fault: this batch fails")
        return self.inner(x)


# -- the repository --------------------------------------------------------------------------------
def build_repository(folder: Path, seed: int, aa_lanes: int, fault_lanes: int, log=print) -> dict:
    """fraud version 1 and its copies (lanes, fraud_route, fraud_shadow): {"lanes": {model: kind}, "file", "metadata"}."""
    from serving.registry import ModelRepository
    from training.bootstrap import bootstrap

    bootstrap(str(folder), rows=20_000, epochs=3, seed=seed, num_threads=1, log=lambda line: None)
    repo = ModelRepository(str(folder))
    model_file = Path(repo.version(BASE, 1).path, "model.pt").read_bytes()
    metadata = repo.metadata(BASE, 1)
    lanes = {f"fraud_aa{i}": "aa" for i in range(aa_lanes)} | {f"fraud_f{i}": "fault" for i in range(fault_lanes)}
    params = {"aa": {}, "fault": {"fleet.rollout.stages": FAULT_STAGES, "fleet.rollout.min_stage_requests": str(NEVER)},
              "route5": {"fleet.rollout.stages": "5,100", "fleet.rollout.min_stage_requests": str(NEVER),
                         "fleet.rollout.gates": "errors"},
              "route50": {"fleet.rollout.stages": "50,100", "fleet.rollout.min_stage_requests": str(NEVER),
                          "fleet.rollout.gates": "errors"},
              "shadow": {"fleet.rollout": "shadow", "fleet.rollout.shadow_share": "1.0",
                         "fleet.rollout.min_stage_requests": str(NEVER)}}
    wide_file = wide_model_file(len(metadata["feature_names"]), seed=seed)
    probes = {"fraud_route5": "route5", "fraud_route50": "route50", WIDE: "route50", "fraud_shadow": "shadow"}
    for name, kind in {**lanes, **probes}.items():
        config = repo.config_proto(BASE)
        config.name = name
        for key, value in params[kind].items():
            config.parameters[key].string_value = value
        repo.publish(name, {"model.pt": wide_file if name == WIDE else model_file},
                     {**metadata, "note": f"fraud, rollout trials ({kind})"}, config=config)
    log(f"rollout trials: repository with {', '.join(sorted(lanes))}, {', '.join(probes)}")
    return {"repo": repo, "lanes": lanes, "file": model_file, "wide_file": wide_file, "metadata": metadata}


def candidate_file(model_file: bytes, t: TrialType, slow_iterations: int | None) -> bytes:
    from benchmarks import rollout_faults

    if t.fault is None:
        return model_file
    args = (slow_iterations, 1.0) if t.fault == "Slow" else t.args
    fault = FailShareOnTraffic if t.fault == "FailShareOnTraffic" else getattr(rollout_faults, t.fault)
    return rollout_faults.wrap(model_file, fault, *args)


# -- one trial -------------------------------------------------------------------------------------------
async def run_trial(ctx: dict, lane: str, t: TrialType, k: int) -> dict:
    """Publish one candidate of type `t` into `lane`, follow its rollout to the end; its record."""
    admin, repo, stream = ctx["admin"], ctx["repo"], ctx["streams"][lane]
    state = await admin.rollout(lane)
    stable = state["stable"]
    data, slow = ctx["files"].get(t.name), None
    if t.fault == "Slow":  # the delay that makes stable's latency of the last seconds 1.5x, at the replicas' speed
        m_pre = await admin.metrics()
        await asyncio.sleep(5.0)
        recent = mean_latency(version_counts(m_pre, lane, stable), version_counts(await admin.metrics(), lane, stable))
        iterations = max(1, round(0.5 * (recent or ctx["slow_stable_s"]) / ctx["slow_round_s"]))
        data = await asyncio.to_thread(candidate_file, ctx["file"], t, iterations)
        slow = {"iterations": iterations, "stable_recent_ms": None if recent is None else round(recent * 1e3, 3)}
    window: Counter = Counter()
    stream.windows.append(window)
    m0 = await admin.metrics()
    stable_before = version_counts(m0, lane, stable)
    t_publish = time.time()
    version = await asyncio.to_thread(repo.publish, lane, {"model.pt": data},
                                      {**ctx["metadata"], "gate": "accepted", "parent": stable,
                                       "note": f"rollout trial {t.name} #{k}"})
    record = {"type": t.name, "trial": k, "lane": lane, "version": version, "stable": stable,
              "published_at": round(t_publish - ctx["t0"], 2)}
    started = await admin.wait(lane, lambda s: s.get("candidate") == version or version in (s.get("rolled_back") or [])
                               or s.get("stable") == version, 60, f"the rollout of version {version}", 0.25)
    horizon_s = AA_MAX_S if t.horizon is None else 2 * t.horizon / (ctx["rate"] * float(FAULT_STAGES.split(",")[0])
                                                                     / 100) + 60
    deadline = time.monotonic() + horizon_s
    aborted, judged, state = None, 0, started
    while not (state["status"] == "idle" and (state["stable"] == version or version in state.get("rolled_back", []))):
        judged = int(((state.get("arms") or {}).get(str(version)) or {}).get("requests", judged))
        if aborted is None and ((t.horizon is not None and judged >= t.horizon) or time.monotonic() > deadline):
            aborted = {"judged": judged, "why": "horizon" if t.horizon is not None and judged >= t.horizon
                       else "time"}
            try:
                state = await admin.act(lane, "abort")
                continue
            except RuntimeError as exc:  # decided meanwhile: read the state again
                aborted["error"] = str(exc)
        await asyncio.sleep(0.5)
        state = await admin.rollout(lane)
    t_end = time.time()
    history = state.get("history") or []
    start = next((h for h in reversed(history) if h.get("event") == "start" and h.get("version") == version), None)
    final = next((h for h in reversed(history) if h.get("version") == version
                  and h.get("event") in ("promote", "rollback", "abort")), None)
    stages = [h for h in history if start and h["at"] >= start["at"] and h.get("event") == "stage"]
    await asyncio.sleep(3.0)  # the candidate's stragglers answered, the replicas' counters pushed
    stream.windows.remove(window)
    m1 = await admin.metrics()
    audit = admin.decision_record(lane, version) or {}
    arms = audit.get("arms") or {}
    gates = ((audit.get("evidence") or {}).get("gates") or {})
    candidate = version_counts(m1, lane, version)
    stable_after = version_counts(m1, lane, stable)
    stable_mean = mean_latency(stable_before, stable_after)
    candidate_mean = candidate["time_s"] / candidate["success"] if candidate["success"] else None
    decision = {"promote": "promote", "rollback": "rollback"}.get(final and final["event"], "held")
    rejected = [g for g, e in gates.items() if e.get("state") == "reject"]
    if decision == "rollback" and str(audit.get("reason", "")).startswith("the candidate failed to load"):
        rejected = ["load"]
    p50 = {v: ((arms.get(str(v)) or {}).get("latency_upper_bound") or {}).get("p50_ms") for v in (stable, version)}
    record.update(slow=slow, arms_p50_ms=p50,
                  arms_p50_ratio=round(p50[version] / p50[stable], 3) if p50[version] and p50[stable] else None)
    record.update(
        decision=decision, decided_by=(final or {}).get("by"), aborted=aborted,
        start_at=None if start is None else round(start["at"] - ctx["t0"], 2),
        decision_at=None if final is None else round(final["at"] - ctx["t0"], 2),
        start_to_decision_s=None if start is None or final is None else round(final["at"] - start["at"], 2),
        stages=[{"weight": h.get("weight"), "after_s": round(h["at"] - start["at"], 2)} for h in stages],
        canary_requests=int((arms.get(str(version)) or {}).get("requests", 0)),
        canary_errors=int((arms.get(str(version)) or {}).get("errors", 0)),
        stable_requests=int((arms.get(str(stable)) or {}).get("requests", 0)),
        rejected_by=rejected,
        gates={g: {k: e.get(k) for k in ("state", "statistic", "threshold", "n", "estimate")} for g, e in gates.items()},
        reason=audit.get("reason"),
        exposure=int(candidate["success"] + candidate["failure"]),
        client_requests=sum(window.values()),
        client_non200=sum(n for (status, _), n in window.items() if status != 200),
        client_by_candidate=sum(n for (status, v), n in window.items() if status == 200 and v == str(version)),
        stable_mean_ms=None if stable_mean is None else round(stable_mean * 1e3, 4),
        candidate_mean_ms=None if candidate_mean is None else round(candidate_mean * 1e3, 4),
        latency_ratio=None if not (stable_mean and candidate_mean) else round(candidate_mean / stable_mean, 4),
        seconds=round(t_end - t_publish, 1), load_avg_1m=round(os.getloadavg()[0], 2))
    return record


async def run_lane(ctx: dict, lane: str, queue: list[tuple[TrialType, int]], log=print) -> None:
    while queue and time.time() < ctx["budget_end"]:
        t, k = queue.pop(0)
        try:
            r = await run_trial(ctx, lane, t, k)
        except Exception as exc:  # noqa: BLE001 - a trial that could not run is reported, the lane goes on
            log(f"  {lane}: trial {t.name} #{k} failed to run: {exc!r}")
            ctx["failed_trials"].append({"type": t.name, "trial": k, "lane": lane, "error": repr(exc)})
            await asyncio.sleep(5.0)
            continue
        ctx["trials"].append(r)
        log(f"  {time.time() - ctx['t0']:5.0f} s {lane}: {t.name} #{k} v{r['version']}: {r['decision']}"
            + (f" by {','.join(r['rejected_by'])}" if r["rejected_by"] else "")
            + f", {r['canary_requests']} canary requests judged, exposure {r['exposure']}, "
            f"client non-200 {r['client_non200']}, {r['seconds']:.0f} s"
            + (f", {r['start_to_decision_s']:.0f} s to decide" if r["start_to_decision_s"] is not None else "")
            + (f", latency x{r['latency_ratio']:.2f}" if r.get("latency_ratio") and t.fault == "Slow" else ""))


async def slow_round_cost(ctx: dict, lane: str, iterations: int, log=print) -> tuple[float | None, dict]:
    """Seconds one round of Slow's loop takes in the replicas under the run's load: a Slow(`iterations`) candidate
    runs ~10 s as a canary on `lane` (then aborted, or rolled back meanwhile), and its compute time per model
    execution less stable's (`fleet_inference_compute_infer_time_seconds` / `_exec_count`), over `iterations`."""
    from benchmarks.rollout_faults import Slow, wrap

    admin, repo = ctx["admin"], ctx["repo"]
    data = await asyncio.to_thread(wrap, ctx["file"], Slow, iterations, 1.0)
    m0 = await admin.metrics()
    version = await asyncio.to_thread(repo.publish, lane, {"model.pt": data},
                                      {**ctx["metadata"], "gate": "accepted", "note": "Slow calibration"})
    await asyncio.sleep(10.0)
    state = await admin.rollout(lane)
    if state.get("candidate") == version:
        await admin.act(lane, "abort")
    await asyncio.sleep(3.0)
    m1 = await admin.metrics()

    def per_exec(v: int) -> float | None:
        def delta(name: str) -> float:
            def one(text: str) -> float:
                return (metric_sum(text, name + "_total", model=lane, version=str(v))
                        or metric_sum(text, name, model=lane, version=str(v)) or 0.0)
            return one(m1) - one(m0)
        n = delta("fleet_inference_exec_count")
        return delta("fleet_inference_compute_infer_time_seconds") / n if n else None

    cand, stable = per_exec(version), per_exec(1)
    cost = (cand - stable) / iterations if cand is not None and stable is not None and cand > stable else None
    probe = {"iterations": iterations, "version": version, "compute_per_exec_ms": {
        "candidate": None if cand is None else round(cand * 1e3, 4), "stable": None if stable is None else
        round(stable * 1e3, 4)}, "round_us": None if cost is None else round(cost * 1e6, 3)}
    log(f"  Slow calibration: compute per execution {probe['compute_per_exec_ms']} ms with {iterations} rounds: "
        f"{probe['round_us']} µs a round in the replicas")
    return cost, probe


async def stable_latency(ctx: dict, lanes: list[str], seconds: float) -> float:
    """Mean server latency (s) of version 1 of `lanes` over `seconds` of their load, from /metrics."""
    m0 = await ctx["admin"].metrics()
    await asyncio.sleep(seconds)
    m1 = await ctx["admin"].metrics()
    before = [version_counts(m0, lane, 1) for lane in lanes]
    after = [version_counts(m1, lane, 1) for lane in lanes]
    n = sum(a["success"] - b["success"] for a, b in zip(after, before))
    return sum(a["time_s"] - b["time_s"] for a, b in zip(after, before)) / n


# -- the run -----------------------------------------------------------------------------------------------------
async def _run(args, log=print) -> dict:
    import aiohttp

    from benchmarks.rollout_faults import calibrate_iterations
    from cluster.config import FleetSettings

    work = Path(tempfile.mkdtemp(prefix="fleet-rollout-trials-"))
    log(f"rollout trials: training fraud version 1 into {work / 'repository'} ...")
    built = build_repository(work / "repository", args.seed, args.aa_lanes, args.fault_lanes, log)
    token = secrets.token_urlsafe(16)
    settings = FleetSettings(repository=str(work / "repository"), data_dir=str(work / "data"),
                             state_dir=str(work / "state"), train_storage=str(work / "train"), admin_token=token,
                             version_poll_interval_s=1.0, retrain_after_s=None)
    # The Slow loop's speed, measured before any load shares this process's core.
    rounds_per_s = calibrate_iterations(1.0)
    log("rollout trials: starting the cluster ...")
    cluster, settings = start_cluster(settings, log=log)
    report: dict = {"git_sha": git_sha(), "machine": machine(),
                    "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "settings": {k: v for k, v in settings.model_dump().items() if k not in ("api_keys", "admin_token")}}
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=512)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
    ctx = {"admin": Admin(session, settings.url, token, settings.data_dir), "repo": built["repo"],
           "file": built["file"], "metadata": built["metadata"], "session": session, "url": settings.url,
           "work": work, "repo_dir": str(work / "repository"), "rate": args.rate,
           "rows": request_rows(4096, args.seed), "trials": [], "failed_trials": [], "t0": time.time()}
    streams: dict[str, Stream] = {}
    tasks = []
    try:
        if args.routing_rounds:
            log("rollout trials: canary routing cost (wrk) ...")
            report["routing"] = [await routing_probe(ctx, model, weight, args.routing_rounds, args.wrk_runs, args.wrk_s,
                                                     log, file=file)
                                 for model, weight, file in (("fraud_route5", 0.05, None), ("fraud_route50", 0.5, None),
                                                             (WIDE, 0.5, built["wide_file"]))]
        if args.shadow_s:
            log("rollout trials: shadow overhead ...")
            report["shadow"] = await shadow_probe(ctx, args.shadow_rate, args.shadow_s, args.shadow_rounds, log)
        if args.leak_requests:
            log("rollout trials: shadow leaks at peak (wrk) ...")
            report["leak"] = await leak_probe(ctx, args.leak_requests, args.leak_chunk_s, log)
        lanes = built["lanes"]
        streams = {lane: Stream(session, settings.url, lane, ctx["rows"], args.rate) for lane in lanes}
        ctx["streams"] = streams
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(s.run()) for s in streams.values()]
        await asyncio.sleep(10.0)  # warm-up
        faults = [lane for lane, kind in lanes.items() if kind == "fault"]
        mean_s = await stable_latency(ctx, faults, 10.0)
        first = max(1, round(0.5 * mean_s * rounds_per_s))
        log(f"rollout trials: stable's mean server latency {mean_s * 1e3:.3f} ms at {args.rate:g} req/s per lane; "
            f"Slow: {first} rounds ({first / rounds_per_s * 1e3:.3f} ms in this process) to probe with")
        round_s, probe = await slow_round_cost(ctx, faults[0], first, log=log)
        ctx["slow_round_s"] = round_s or 1.0 / rounds_per_s
        ctx["slow_stable_s"] = mean_s
        iterations = max(1, round(0.5 * mean_s / ctx["slow_round_s"]))
        ctx["files"] = {t.name: await asyncio.to_thread(candidate_file, built["file"], t, iterations) for t in TYPES}
        report["config"] = {"rate_rps": args.rate, "aa_lanes": args.aa_lanes, "fault_lanes": args.fault_lanes,
                            "fault_stages": FAULT_STAGES, "trials_per_type": args.trials,
                            "budget_minutes": args.budget_minutes, "aa_max_s": AA_MAX_S,
                            "slow": {"target_ratio": 1.5, "stable_mean_ms": round(mean_s * 1e3, 4),
                                     "iterations_at_start": iterations, "rounds_per_s_here": rounds_per_s,
                                     "round_s_replicas": ctx["slow_round_s"], "probe": probe,
                                     "per_trial": "iterations = 0.5 x stable's mean latency over the 5 s before "
                                                  "the trial / round_s_replicas"}}
        chosen = [t for t in TYPES if t.name in args.types]
        fault_queue = [(t, k) for k in range(args.trials) for t in chosen if t.lane == "fault"]
        aa_queue = [(t, k) for k in range(args.trials) for t in chosen if t.lane == "aa"]
        started = time.time()
        ctx["budget_end"] = started + 60 * args.budget_minutes
        log(f"rollout trials: {len(fault_queue)} fault and {len(aa_queue)} A/A trials on {len(lanes)} lanes "
            f"at {args.rate:g} req/s each; no trial starts after {args.budget_minutes:g} min")
        await asyncio.gather(*(run_lane(ctx, lane, fault_queue if kind == "fault" else aa_queue, log)
                               for lane, kind in lanes.items()))
        report["trials_minutes"] = (time.time() - started) / 60
        report["not_run"] = dict(Counter(t.name for t, _ in fault_queue + aa_queue))
    finally:
        for s in streams.values():
            await s.stop()
        for task in tasks:
            task.cancel()
        report["load"] = {lane: {"sent": s.sent, "answers": {f"{st} v{v}": n for (st, v), n in s.total.items()},
                                 "errors_sample": s.errors[:5]} for lane, s in streams.items()}
        await session.close()
        cluster.stop()
    report["types"] = [asdict(t) for t in TYPES]
    report["trials"] = ctx["trials"]
    report["failed_trials"] = ctx["failed_trials"]
    report["summary"] = summarise(report["types"], report["trials"])
    report["goals"] = goals(report)
    shutil.rmtree(work, ignore_errors=True)
    return report


def write_files(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "summary.md").write_text(markdown(report))
    plot_delays(report, out / "delays.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_trials", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, help="trials per type (default 30; --quick 3)")
    p.add_argument("--quick", action="store_true", help="3 trials per type, 1 A/A and 2 fault lanes, short probes")
    p.add_argument("--budget-minutes", type=float, help="no trial starts after this many minutes (45; --quick 12)")
    p.add_argument("--rate", type=float, default=200.0, help="requests/s per lane model")
    p.add_argument("--aa-lanes", type=int, help="A/A lane models (2; --quick 1)")
    p.add_argument("--fault-lanes", type=int, help="fault lane models (2; --quick 2)")
    p.add_argument("--types", default=",".join(t.name for t in TYPES), help="comma-separated trial types")
    p.add_argument("--routing-rounds", type=int, help="ABAB rounds of the routing probe (2; --quick 1; 0: skip)")
    p.add_argument("--wrk-runs", type=int, help="wrk runs per phase of a round (3; --quick 1)")
    p.add_argument("--wrk-s", type=float, help="seconds per wrk run (8; --quick 5)")
    p.add_argument("--shadow-rate", type=float, default=300.0)
    p.add_argument("--shadow-s", type=float, help="seconds per shadow-probe segment (30; --quick 10; 0: skip)")
    p.add_argument("--shadow-rounds", type=int, help="ABBA rounds of the shadow probe (2; --quick 1)")
    p.add_argument("--leak-requests", type=int, help="answers checked at peak in shadow mode (10^6; --quick 20,000; "
                   "0: skip)")
    p.add_argument("--leak-chunk-s", type=float, help="seconds per wrk run of the leak probe (60; --quick 10)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--render", action="store_true", help="no run: redraw summary.md and delays.png from report.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        report = json.loads((out / "report.json").read_text())
        report["summary"] = summarise(report["types"], report["trials"])
        report["goals"] = goals(report)
        write_files(out, report)
        print(markdown(report))
        return 0
    defaults = {"trials": (30, 3), "budget_minutes": (45.0, 12.0), "aa_lanes": (2, 1), "fault_lanes": (2, 2),
                "routing_rounds": (2, 1), "wrk_runs": (3, 1), "wrk_s": (8.0, 5.0), "shadow_s": (30.0, 10.0),
                "shadow_rounds": (2, 1), "leak_requests": (1_000_000, 20_000),
                "leak_chunk_s": (60.0, 10.0)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.types = [t for t in args.types.split(",") if t]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the cluster is stopped on the way out
    report = asyncio.run(_run(args, log=lambda line: print(line, flush=True)))
    report["argv"] = sys.argv[1:]
    write_files(out, report)
    print(markdown(report))
    print(f"wrote {out}/report.json, summary.md, delays.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
