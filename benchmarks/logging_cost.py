"""`python -m benchmarks.logging_cost`: what logging every prediction costs fleet, and whether it loses any.

    python -m benchmarks.logging_cost                 # 2 clusters alternating 5 min each, then 10 minutes at 80 % (about 25 min)
    python -m benchmarks.logging_cost --quick         # 1 cluster alternating 60 s, 1 minute at 80 % (about 5 min)
    python -m benchmarks.logging_cost --clusters 3 --seconds 600 --minutes 30
    python -m benchmarks.logging_cost --rounds 3      # also the older design: clusters with the log on and off

1. Peak throughput with every row logged against none, alternating on the same connections of one
   cluster. The repository holds the fraud model twice: `fraud` (`fleet.log.sample` 1, every answered
   row written) and `fraud_unlogged` (the same TorchScript and config with `fleet.log.sample` 0:
   nothing logged, no request id made). A cluster (`cluster.local.LocalCluster`, this process, the
   log on and written every 0.5 s, every other setting the cluster's default) is warmed up on both;
   then one wrk run (Debian's, closed loop, 64 connections, one-row JSON bodies,
   `benchmarks.wrk.run_alternating` with `lua/alternate.lua`) loads them for `--seconds` in phases of
   `--phase` seconds, A B B A A B B A ..., and counts each phase's answers. Each pair of phases gives
   one ratio, logged over unlogged; their mean, with a 95 % bootstrap interval, is the cost. Goal: the
   log costs <= 3 % of peak throughput, met when the interval's upper end is.
   Why this design: the machine's throughput moves by 10-20 % between seconds whatever fleet does
   (an A/A run of this design, both paths unlogged, gave pairs with a standard deviation of 14 %),
   and separate runs add where the kernel places the connections among the replicas. Phases of the
   same connections cancel the latter and slow drifts; many short pairs average the former. The
   0.5 s flush puts the writer's work in the phases that brought its rows (its default, 5 s, would
   move much of it into the unlogged phases after them; smaller files cost a little more per row, so
   this errs toward a higher cost). During the run the log's own time is read as well
   (`fleet_prediction_log_cpu_seconds_total`: the writer threads' CPU and the request path's hand-over)
   and reported as a share of the cluster's CPU spent on logged requests: what the log's code costs
   directly, a lower bound of its cost (it leaves out the request ids and anything indirect).
   `--rounds N` adds the older design (N ABBA rounds of clusters with the log on and off, `--repeats`
   runs each), whose spread between clusters is larger than the cost.
2. During those runs: the drift computation's share of the cluster's CPU, the increase of
   `fleet_monitor_cpu_seconds_total` over the CPU time of every process of the cluster
   (`/proc/<pid>/stat`, `benchmarks.live_cluster.ClusterCpu`). Goal: <= 1 %.
3. A cluster with the log on then carries about 80 % of the median logged peak for `--minutes`
   (one-minute parts): wrk again, closed loop, at the connection count that short probes found
   nearest that rate (bisection over 1..64). Not an open-loop generator: the asyncio one
   (`benchmarks.loadgen`) needs a core of its own at 12,000 requests/s, and on 2 cores it
   overloads the server it measures (a trial delivered 11,300 of 12,180 requests/s with a p99 of
   5.7 s); and Debian's wrk paces only by a whole-millisecond `delay()` per connection, which
   did not reach the rate (227 paced connections gave 5,800 requests/s). Goals: no row dropped
   (`fleet_prediction_log_dropped_total`) and every answered row on disk (the log's rows counted
   with pyarrow against the 200 answers), once the replicas' buffers are empty and again after
   the graceful stop.

Writes report.json (git SHA, parameters, every run) and summary.md into --out (default
benchmarks/results/logging_cost/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.live_cluster import ClusterCpu, fetch_text, metric_sum, start_cluster
from benchmarks.logging_report import cost_goals, cost_markdown, cpu_share, log_cpu_summary, pair_ratios, \
    paired_ratios
from benchmarks.report import git_sha, machine

__all__ = ["main", "run_logging_cost"]

MODEL = "fraud"
UNLOGGED = "fraud_unlogged"  # MODEL again with fleet.log.sample 0
RESULTS = Path("benchmarks/results/logging_cost")
_MONITOR_PROCESS = "ray::MonitorAc"  # the monitor actor's process (comm is cut at 15 characters)


def _metrics(url: str) -> dict:
    try:
        text = fetch_text(f"{url}/metrics")
    except OSError:
        return {}
    return {"monitor_cpu_s": metric_sum(text, "fleet_monitor_cpu_seconds_total"),
            "log_rows": metric_sum(text, "fleet_prediction_log_rows_total", model=MODEL),
            "log_dropped": metric_sum(text, "fleet_prediction_log_dropped_total", model=MODEL),
            "log_buffered": metric_sum(text, "fleet_prediction_log_buffered_rows")}


def _delta(after: dict, before: dict, key: str) -> float | None:
    if after.get(key) is None:
        return None
    return after[key] - (before.get(key) or 0.0)


def _measured(cpu: ClusterCpu, url: str, run):
    """Run `run()` between two readings of the cluster's CPU and the monitor's counters."""
    m0, c0 = _metrics(url), cpu.read()
    result = run()
    m1, c1 = _metrics(url), cpu.read()
    used = ClusterCpu.used(c0, c1)
    by_name = ClusterCpu.by_name(c0, c1)
    monitor_process = sum(v for name, v in by_name.items() if name.startswith(_MONITOR_PROCESS))
    return result, {"cluster_cpu_s": round(used, 2), "monitor_cpu_s": _delta(m1, m0, "monitor_cpu_s"),
                    "monitor_share": cpu_share(_delta(m1, m0, "monitor_cpu_s"), used),
                    "monitor_process_cpu_s": round(monitor_process, 2),
                    "monitor_process_share": cpu_share(monitor_process, used),
                    "log_rows": _delta(m1, m0, "log_rows"), "log_dropped": _delta(m1, m0, "log_dropped"),
                    "top_processes": dict(list(by_name.items())[:8])}


def _settings(work: Path, name: str, logging: bool):
    from cluster.config import FleetSettings

    return FleetSettings(repository=str(work / "repository"), data_dir=str(work / f"data-{name}"),
                         state_dir=str(work / f"state-{name}"), train_storage=str(work / "train"),
                         log_predictions=logging, retrain_after_s=None)


def peak_round(work: Path, body: Path, name: str, logging: bool, repeats: int, duration_s: float,
               connections: int, log=print) -> dict:
    """Start a cluster with the log on or off, warm it up, measure `repeats` wrk peaks; stop it."""
    from benchmarks.wrk import run_wrk

    cluster, settings = start_cluster(_settings(work, name, logging), log=log)
    cpu = ClusterCpu()
    runs = []
    try:
        url = f"{settings.url}/v2/models/{MODEL}/infer"
        run_wrk(url, body, connections=16, duration_s=3)  # warm-up: connections, the JIT's first batches
        for _ in range(repeats):
            result, extra = _measured(cpu, settings.url, lambda: run_wrk(url, body, connections=connections,
                                                                          threads=2, duration_s=duration_s))
            runs.append(_run_doc(result, extra))
            log(f"  {name:10s} log {'on ' if logging else 'off'}: {runs[-1]['throughput_rps']:8.0f} req/s  "
                f"p99 {runs[-1]['latency_ms']['p99']:.1f} ms  "
                f"cluster CPU {runs[-1]['cluster_cpu_us_per_request']} us/request  "
                f"monitor CPU share {extra['monitor_share']}  "
                f"(monitor process {extra['monitor_process_share']})")
            time.sleep(0.5)
    finally:
        cluster.stop()
    return {"name": name, "logging": logging, "runs": runs,
            "median_rps": statistics.median(r["throughput_rps"] for r in runs)}


def unlogged_copy(repository: Path) -> None:
    """MODEL again as UNLOGGED: the same versions and config.pbtxt, with `fleet.log.sample` 0."""
    target = repository / UNLOGGED
    shutil.copytree(repository / MODEL, target)
    config = (target / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{UNLOGGED}"', 1)
    if f'name: "{UNLOGGED}"' not in config:
        raise RuntimeError(f"{MODEL}/config.pbtxt names no model {MODEL!r}")
    (target / "config.pbtxt").write_text(
        config + 'parameters {\n  key: "fleet.log.sample"\n  value {\n    string_value: "0"\n  }\n}\n')


def _run_doc(result, extra: dict) -> dict:
    doc = result.to_dict()
    return {"throughput_rps": round(doc["throughput_rps"], 1), "requests": doc["requests"],
            "statuses": doc["statuses"], "errors": doc["errors"],
            "latency_ms": {k: doc["latency_ms"][k] for k in ("p50", "p99")},
            "cluster_cpu_us_per_request": round(1e6 * extra["cluster_cpu_s"] / max(doc["requests"], 1), 1), **extra}


def alternating_cluster(work: Path, body: Path, name: str, seconds: float, phase_s: float, connections: int,
                        log=print) -> dict:
    """One cluster with the log on (files every 0.5 s, so the writer's work lands in the phases that brought its
    rows): wrk alternates between MODEL and UNLOGGED by phases of `phase_s` over the same connections for
    `seconds`; "pairs" holds each pair of phases' (logged, unlogged) answers, "log_cpu_s" the time the log
    counted for itself (`fleet_prediction_log_cpu_seconds_total`) and "cluster_cpu_s" the cluster's."""
    from benchmarks.wrk import phase_pairs, run_alternating, run_wrk

    settings = _settings(work, name, True).model_copy(update={"log_flush_interval_s": 0.5})
    cluster, settings = start_cluster(settings, log=log)
    cpu = ClusterCpu()
    paths = [f"/v2/models/{m}/infer" for m in (MODEL, UNLOGGED)]
    try:
        for path in paths:  # warm-up: connections, the JIT's first batches, both batchers
            run_wrk(settings.url + path, body, connections=16, duration_s=3)
        _wait_flushed(settings.url)
        text0, c0 = fetch_text(f"{settings.url}/metrics"), cpu.read()
        result = run_alternating(settings.url, body, paths[0], paths[1], seconds, phase_s, connections)
        _wait_flushed(settings.url, timeout_s=60)
        text1, c1 = fetch_text(f"{settings.url}/metrics"), cpu.read()
    finally:
        cluster.stop()
    pairs = phase_pairs(result["phases"])

    def grew(name: str, **labels: str) -> float:
        return (metric_sum(text1, name, **labels) or 0.0) - (metric_sum(text0, name, **labels) or 0.0)

    log_cpu = {part: round(grew("fleet_prediction_log_cpu_seconds_total", model=MODEL, part=part), 3)
               for part in ("writer", "request_path")}
    logged = sum(a for a, _ in pairs)
    unlogged = sum(b for _, b in pairs)
    used = ClusterCpu.used(c0, c1)
    # The log's time over the CPU the cluster spent on logged requests (about their share of every answer).
    share = cpu_share(sum(log_cpu.values()), used * logged / (logged + unlogged)) if logged + unlogged else None
    monitor_s = grew("fleet_monitor_cpu_seconds_total")
    out = {"name": name, "seconds": seconds, "phase_s": phase_s, "pairs": pairs, "errors": result["errors"],
           "non_2xx": sum(p["other"] for p in result["phases"].values()),
           "log_cpu_s": log_cpu, "cluster_cpu_s": round(used, 2), "log_cpu_share": share,
           "monitor_share": cpu_share(monitor_s, used), "logged_answers": logged, "unlogged_answers": unlogged,
           "log_rows": grew("fleet_prediction_log_rows_total", model=MODEL)}
    ratios = [a / b for a, b in pairs]
    log(f"  {name}: {len(pairs)} pairs of {phase_s:g} s phases, logged/unlogged mean "
        f"{statistics.mean(ratios) if ratios else float('nan'):.4f}; the log's own time {log_cpu} s = "
        f"{share} of the logged requests' cluster CPU")
    return out


def _log_rows_on_disk(data_dir: str) -> int:
    import pyarrow.dataset as ds

    folder = Path(data_dir) / "traffic" / MODEL
    if not folder.is_dir():
        return 0
    return ds.dataset(folder, format="parquet", partitioning="hive").count_rows()


def _wait_flushed(url: str, timeout_s: float = 120.0) -> dict:
    """Until the replicas hold no log rows and the written count has stopped moving; the last metrics."""
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        m = _metrics(url)
        if m.get("log_buffered") == 0 and last is not None and m.get("log_rows") == last.get("log_rows"):
            return m
        last = m
        time.sleep(2.0)
    return last or {}


def calibrate(url: str, body: Path, rate_rps: float, probes: int = 5, log=print) -> tuple[int, list]:
    """The wrk connection count (1..64) whose closed-loop throughput comes nearest `rate_rps` (4 s probes)."""
    from benchmarks.wrk import run_wrk

    lo, hi, connections, trials = 1, 64, 16, []
    for _ in range(probes):
        got = run_wrk(url, body, connections=connections, threads=min(2, connections), duration_s=4).throughput_rps
        trials.append({"connections": connections, "throughput_rps": round(got, 1)})
        log(f"  calibration: {connections} connections -> {got:.0f} req/s (target {rate_rps:.0f})")
        if got > rate_rps:
            hi = connections - 1
        else:
            lo = connections + 1
        if lo > hi:
            break
        connections = (lo + hi) // 2
    best = min(trials, key=lambda t: abs(t["throughput_rps"] - rate_rps))
    return best["connections"], trials


def sustained_log(work: Path, body: Path, rate_rps: float, minutes: float, log=print) -> dict:
    """About `rate_rps` from wrk for `minutes` (one-minute parts) with every row logged; drops, rows on disk."""
    from benchmarks.wrk import run_wrk

    cluster, settings = start_cluster(_settings(work, "sustained", True), log=log)
    cpu, samples, parts = ClusterCpu(), [], []
    stop = threading.Event()
    try:
        run_wrk(f"{settings.url}/v2/models/{MODEL}/infer", body, connections=16, duration_s=3)
        url = f"{settings.url}/v2/models/{MODEL}/infer"
        connections, trials = calibrate(url, body, rate_rps, log=log)
        base = _wait_flushed(settings.url)
        base_rows = _log_rows_on_disk(settings.data_dir)
        started = time.time()

        def sample() -> None:
            while not stop.wait(10.0):
                samples.append({"t_s": round(time.time() - started, 1), **_metrics(settings.url)})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def load() -> list[dict]:
            out, left, k = [], minutes * 60.0, 0
            while left > 0.5:
                part = run_wrk(url, body, connections=connections, threads=min(2, connections),
                               duration_s=min(60.0, left)).to_dict()
                out.append({"target_rps": rate_rps, "achieved_rps": round(part["throughput_rps"], 1),
                            "requests": part["requests"], "statuses": part["statuses"], "errors": part["errors"],
                            "latency_ms": {q: part["latency_ms"][q] for q in ("p50", "p99", "max")}})
                log(f"  minute {k + 1}: {part['throughput_rps']:.0f} of {rate_rps:.0f} req/s, p99 "
                    f"{part['latency_ms']['p99']:.1f} ms, statuses {part['statuses']} errors {part['errors']}")
                left -= 60.0
                k += 1
            return out

        parts, extra = _measured(cpu, settings.url, load)
        stop.set()
        sampler.join()
        flushed = _wait_flushed(settings.url)
        rows_flushed = _log_rows_on_disk(settings.data_dir) - base_rows
    finally:
        stop.set()
        cluster.stop()  # a graceful stop writes every buffered row
    rows_after_stop = _log_rows_on_disk(settings.data_dir) - base_rows
    answered = sum(p["statuses"].get("200", 0) for p in parts)
    # wrk stops counting at the end of each part: the answers to requests then in flight (up to `connections` a
    # part) are logged but not counted, so the log may hold a few more rows than wrk's 200s, never fewer.
    return {"rate_rps": round(rate_rps, 1), "minutes": minutes, "generator": f"wrk, closed loop, {connections} "
            "connections", "calibration": trials, "parts": parts, "answered_200": answered,
            "requests": sum(p["requests"] for p in parts),
            "transport_errors": sum(sum(p["errors"].values()) for p in parts),
            "dropped": _delta(flushed, base, "log_dropped"), "rows_logged_metric": _delta(flushed, base, "log_rows"),
            "rows_on_disk": rows_flushed, "rows_on_disk_after_stop": rows_after_stop,
            "missing_rows": max(0, answered - rows_flushed),
            "missing_rows_after_stop": max(0, answered - rows_after_stop),
            "uncounted_in_flight_rows": rows_flushed - answered, "in_flight_bound": connections * len(parts),
            "max_buffered_rows": max((s.get("log_buffered") or 0 for s in samples), default=None),
            "samples": samples, **extra}


def run_logging_cost(args, log=print) -> dict:
    from benchmarks.bodies import request_bodies
    from training.bootstrap import bootstrap

    work = Path(tempfile.mkdtemp(prefix="fleet-logcost-"))
    log(f"logging cost: training fraud into {work / 'repository'} ...")
    bootstrap(str(work / "repository"), rows=8000, epochs=2, log=lambda line: None)
    unlogged_copy(work / "repository")
    body = work / "fraud-json.body"
    body.write_bytes(request_bodies(str(work / "repository"), MODEL, rows=1)["json"][0])
    clusters = [alternating_cluster(work, body, f"c{c + 1}", args.seconds, args.phase, args.connections, log)
                for c in range(args.clusters)]
    rounds = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)  # ABBA: a trend over the run cancels out
        for logging in order:
            name = f"r{r + 1}-{'on' if logging else 'off'}"
            rounds.append({"round": r + 1, **peak_round(work, body, name, logging, args.repeats, args.duration,
                                                          args.connections, log)})
    report = {"git_sha": git_sha(), "machine": machine(),
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "config": vars(args), "model": MODEL, "unlogged_model": UNLOGGED, "clusters": clusters,
              "paired": paired_ratios([p for c in clusters for p in c["pairs"]]), "rounds": rounds,
              "ratio": pair_ratios(rounds) if rounds else {}, "log_cpu": log_cpu_summary(clusters)}
    on_runs = [run for rd in rounds if rd["logging"] for run in rd["runs"]]
    off_runs = [run for rd in rounds if not rd["logging"] for run in rd["runs"]]
    # The logged peak: answers per second of the logged phases (or of the rounds' logged runs).
    peaks = [a / c["phase_s"] for c in clusters for a, _ in c["pairs"]] + [run["throughput_rps"] for run in on_runs]
    report["peak_logged_rps"] = statistics.median(peaks)
    report["cpu"] = {
        "monitor_share_on": [run["monitor_share"] for run in on_runs] + [c["monitor_share"] for c in clusters],
        "monitor_share_off": [run["monitor_share"] for run in off_runs],
        "cluster_cpu_us_per_request_on": statistics.median(run["cluster_cpu_us_per_request"] for run in on_runs)
        if on_runs else None,
        "cluster_cpu_us_per_request_off": statistics.median(run["cluster_cpu_us_per_request"] for run in off_runs)
        if off_runs else None}
    if args.minutes > 0:
        rate = args.sustained_share * report["peak_logged_rps"]
        log(f"sustained: {rate:.0f} req/s ({args.sustained_share:.0%} of the logged peak) for {args.minutes:g} min ...")
        report["sustained"] = sustained_log(work, body, rate, args.minutes, log)
    report["goals"] = cost_goals(report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.logging_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 cluster alternating for 60 s; 1 minute at 80 %%")
    p.add_argument("--clusters", type=int, default=2, help="clusters of the alternating design (each started anew)")
    p.add_argument("--seconds", type=float, default=300.0, help="seconds of alternating load per cluster")
    p.add_argument("--phase", type=float, default=2.0, help="seconds per phase of the alternation")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run of --rounds")
    p.add_argument("--rounds", type=int, default=0, help="also the older design: ABBA rounds of clusters with "
                   "the log on and off")
    p.add_argument("--repeats", type=int, default=3, help="wrk runs per cluster of --rounds")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (the peak point of make bench)")
    p.add_argument("--minutes", type=float, default=None, help="the sustained run at 80 %% of the logged peak "
                   "(default 10; --quick 1; 0 skips it)")
    p.add_argument("--sustained-share", type=float, default=0.8, help="the sustained rate, as a share of the peak")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.clusters, args.seconds = min(args.clusters, 1), min(args.seconds, 60.0)
    if args.clusters < 1 or args.duration <= 0 or args.phase <= 0 or args.seconds < 3.0 + 8 * args.phase:
        p.error("--clusters must be >= 1, --duration and --phase > 0, --seconds at least 3 + 8 phases")
    if args.minutes is None:
        args.minutes = 1.0 if args.quick else 10.0
    from benchmarks.wrk import wrk_available

    if not wrk_available():
        print("wrk is not installed: run `make wrk` (Debian's package)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the cluster is stopped on the way out
    report = run_logging_cost(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "summary.md").write_text(cost_markdown(report))
    print(cost_markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
