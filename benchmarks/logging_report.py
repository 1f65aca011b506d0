"""The logging-cost benchmark's arithmetic: on/off throughput ratios with their spread, CPU shares, goals, markdown.

Pure functions over the recorded runs (see `benchmarks.logging_cost`), unit-tested in
`tests/unit/test_lifecycle_bench.py`.
"""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.lifecycle_report import _fmt, _goal, _goals_table  # one goal shape and format for both reports

__all__ = ["pair_ratios", "paired_ratios", "cpu_share", "log_cpu_summary", "cost_goals", "cost_markdown",
           "COST_TARGET", "CPU_SHARE_TARGET"]

COST_TARGET = 0.03  # the log may cost at most 3 % of peak throughput
CPU_SHARE_TARGET = 0.01  # the drift computation may take at most 1 % of the cluster's CPU


def cpu_share(part_s: float | None, total_s: float | None) -> float | None:
    """part / total, rounded to 5 digits; None when either is missing or the total is not positive."""
    if part_s is None or total_s is None or total_s <= 0:
        return None
    return round(part_s / total_s, 5)


def pair_ratios(rounds: list[dict]) -> dict:
    """Logged over unlogged peak throughput: per round (the ratio of its two clusters' medians), their median,
    min and max, and the ratio of the medians over every run; `cost` = 1 - ratio."""
    per_round = []
    for r in sorted({rd["round"] for rd in rounds}):
        on = [rd["median_rps"] for rd in rounds if rd["round"] == r and rd["logging"]]
        off = [rd["median_rps"] for rd in rounds if rd["round"] == r and not rd["logging"]]
        if on and off and off[0] > 0:
            per_round.append(round(on[0] / off[0], 4))
    on_runs = [run["throughput_rps"] for rd in rounds if rd["logging"] for run in rd["runs"]]
    off_runs = [run["throughput_rps"] for rd in rounds if not rd["logging"] for run in rd["runs"]]
    pooled = round(statistics.median(on_runs) / statistics.median(off_runs), 4) if on_runs and off_runs else None
    median = round(statistics.median(per_round), 4) if per_round else None
    return {"per_round": per_round, "median": median, "min": min(per_round, default=None),
            "max": max(per_round, default=None), "pooled": pooled,
            "cost": None if median is None else round(1.0 - median, 4),
            "on_runs_rps": on_runs, "off_runs_rps": off_runs,
            "on_spread": _spread(on_runs), "off_spread": _spread(off_runs)}


def paired_ratios(pairs: list[tuple[float, float]], resamples: int = 10_000, seed: int = 0) -> dict:
    """Logged over unlogged throughput of back-to-back runs on one cluster, [(logged, unlogged)]: each pair's
    ratio, their mean and median, and a 95 % bootstrap interval of the mean (`resamples` seeded resamples of
    the pairs); `cost` = 1 - mean ratio, `cost_ci` its interval (the interval of 1 - mean)."""
    ratios = [on / off for on, off in pairs if off > 0]
    if not ratios:
        return {"per_pair": [], "n": 0, "mean": None, "median": None, "ci95": None, "cost": None, "cost_ci95": None}
    values = np.asarray(ratios)
    means = np.random.default_rng(seed).choice(values, (resamples, len(values))).mean(axis=1)
    low, high = (float(x) for x in np.quantile(means, [0.025, 0.975]))
    mean = float(values.mean())
    return {"per_pair": [round(r, 4) for r in ratios], "n": len(ratios), "mean": round(mean, 4),
            "median": round(float(np.median(values)), 4), "sd": round(float(values.std(ddof=1)), 4)
            if len(values) > 1 else None, "ci95": [round(low, 4), round(high, 4)], "cost": round(1.0 - mean, 4),
            "cost_ci95": [round(1.0 - high, 4), round(1.0 - low, 4)]}


def log_cpu_summary(clusters: list[dict]) -> dict:
    """The log's own time over every alternating cluster: seconds per part, and their share of the cluster CPU
    spent on logged requests (the cluster's CPU times the logged share of the answers)."""
    parts = {part: round(sum(c["log_cpu_s"][part] for c in clusters), 3) for part in ("writer", "request_path")}
    logged = sum(c["logged_answers"] for c in clusters)
    answers = logged + sum(c["unlogged_answers"] for c in clusters)
    base = sum(c["cluster_cpu_s"] * c["logged_answers"] / (c["logged_answers"] + c["unlogged_answers"])
               for c in clusters if c["logged_answers"] + c["unlogged_answers"])
    rows = sum(c.get("log_rows") or 0 for c in clusters)
    return {"seconds": parts, "share": cpu_share(sum(parts.values()), base), "logged_answers": logged,
            "answers": answers, "us_per_logged_row": round(1e6 * sum(parts.values()) / rows, 2) if rows else None}


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    mid = statistics.median(values)
    return {"median": round(mid, 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "range_pct": round(100.0 * (max(values) - min(values)) / mid, 1) if mid else None}


def cost_goals(report: dict) -> list[dict]:
    """The logging benchmark's promises as goals (the shape of `benchmarks.report.ratios_and_goals`)."""
    goals = []
    paired = report.get("paired")
    if paired:
        cost, ci = paired.get("cost"), paired.get("cost_ci95")
        pct = None if cost is None else round(100 * cost, 2)
        bounds = "" if not ci else f", 95 % interval {100 * ci[0]:.1f} to {100 * ci[1]:.1f} %"
        # Met only when the interval's upper end is within the target: a point estimate under it is not enough.
        met = None if pct is None else (ci[1] if ci else cost) <= COST_TARGET
        goals.append(_goal(f"prediction log: cost in peak throughput (1 - mean logged/unlogged over {paired['n']} "
                           f"pairs of alternating phases on the same connections{bounds}; met when the interval's "
                           "upper end is)", pct, 100 * COST_TARGET, met, "%"))
    ratio = report.get("ratio") or {}
    if ratio.get("per_round"):
        cost = ratio.get("cost")
        pct = None if cost is None else round(100 * cost, 2)
        goals.append(_goal(f"prediction log: cost in peak throughput (1 - median logged/unlogged over "
                           f"{len(ratio.get('per_round') or [])} rounds of clusters; per round {ratio.get('per_round')})",
                           pct, 100 * COST_TARGET, None if pct is None else pct <= 100 * COST_TARGET, "%"))
    shares = [s for s in (report.get("cpu") or {}).get("monitor_share_on", []) if s is not None]
    worst = max(shares, default=None)
    goals.append(_goal("drift computation's share of the cluster's CPU at peak (fleet_monitor_cpu_seconds_total, "
                       "worst run)", None if worst is None else round(100 * worst, 3), 100 * CPU_SHARE_TARGET,
                       None if worst is None else worst <= CPU_SHARE_TARGET, "%"))
    sustained = report.get("sustained")
    if sustained:
        label = f"{sustained['rate_rps']:.0f} req/s for {sustained['minutes']:g} min with every row logged"
        dropped = sustained.get("dropped")
        goals.append(_goal(f"{label}: rows dropped (fleet_prediction_log_dropped_total)", dropped, 0,
                           None if dropped is None else dropped == 0))
        missing = sustained.get("missing_rows")
        goals.append(_goal(f"{label}: answered rows missing from the log on disk (of "
                           f"{sustained.get('answered_200', 0):,})", missing, 0, missing == 0))
    return goals




def _paired_markdown(report: dict) -> list[str]:
    paired, clusters = report.get("paired"), report.get("clusters") or []
    if not paired:
        return []
    cfg = report.get("config") or {}
    lines = ["## Logged against unlogged, alternating on the same connections", "",
             f"Per cluster, one wrk run of {cfg.get('seconds'):g} s ({cfg.get('connections')} connections, one-row "
             f"JSON bodies) alternating by phases of {cfg.get('phase'):g} s between `{report.get('model')}` (every "
             f"row logged, files every 0.5 s) and `{report.get('unlogged_model')}` (the same model with "
             "`fleet.log.sample` 0), A B B A ...; each pair of phases gives one ratio.", "",
             "| cluster | pairs | logged answers/s (median phase) | unlogged answers/s (median phase) | mean ratio | "
             "non-2xx | the log's own time: writer / request path (s) | its share of the logged requests' CPU |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in clusters:
        ratios = [a / b for a, b in c["pairs"]]
        lines.append(f"| {c['name']} | {len(ratios)} | "
                     f"{_fmt(statistics.median(a for a, _ in c['pairs']) / c['phase_s'] if ratios else None)} | "
                     f"{_fmt(statistics.median(b for _, b in c['pairs']) / c['phase_s'] if ratios else None)} | "
                     f"{_fmt(statistics.mean(ratios) if ratios else None)} | {c.get('non_2xx', 0)} | "
                     f"{_fmt(c['log_cpu_s']['writer'])} / {_fmt(c['log_cpu_s']['request_path'])} | "
                     f"{'-' if c.get('log_cpu_share') is None else _fmt(100 * c['log_cpu_share']) + ' %'} |")
    ci = paired.get("ci95") or [None, None]
    lines += ["", f"Logged / unlogged over {paired['n']} pairs: mean {_fmt(paired.get('mean'))} (95 % bootstrap "
              f"interval {_fmt(ci[0])} to {_fmt(ci[1])}), median {_fmt(paired.get('median'))}, sd of a pair "
              f"{_fmt(paired.get('sd'))}: the log costs {_fmt(None if paired.get('cost') is None else 100 * paired['cost'])} % "
              "of peak throughput.", ""]
    own = report.get("log_cpu") or {}
    if own.get("share") is not None:
        lines += [f"The log's own time (`fleet_prediction_log_cpu_seconds_total`): writer threads "
                  f"{_fmt(own['seconds']['writer'])} s, request path {_fmt(own['seconds']['request_path'])} s, "
                  f"{_fmt(own.get('us_per_logged_row'))} µs per row written: {_fmt(100 * own['share'])} % of the "
                  "cluster CPU spent on logged requests (a lower bound of the cost: request ids and anything "
                  "indirect are not in it).", ""]
    return lines


def cost_markdown(report: dict) -> str:
    cfg = report.get("config") or {}
    lines = [f"# fleet prediction-log cost, git {report.get('git_sha')}, {report.get('created_at')}", "",
             f"Load average at the start {(report.get('machine') or {}).get('load_average')}.", ""]
    lines += _paired_markdown(report)
    if report.get("rounds"):
        lines += [f"Clusters with the log on and off: wrk, {cfg.get('connections')} connections, one-row JSON bodies "
                  f"to `{report.get('model')}`, {cfg.get('repeats')} runs of {cfg.get('duration')} s per cluster, "
                  "clusters in ABBA order.", "",
                  "| cluster | log | runs req/s | median req/s | p99 ms (median run) | cluster CPU µs / request | "
                  "monitor CPU share | monitor process share |", "|---|---|---|---:|---:|---|---|---|"]
    for rd in report.get("rounds") or []:
        runs = rd["runs"]
        p99 = statistics.median(r["latency_ms"]["p99"] or 0 for r in runs) if runs else None
        lines.append(f"| {rd['name']} | {'on' if rd['logging'] else 'off'} | "
                     f"{', '.join(str(round(r['throughput_rps'])) for r in runs)} | {rd['median_rps']:.0f} | "
                     f"{_fmt(p99)} | {', '.join(_fmt(r.get('cluster_cpu_us_per_request')) for r in runs)} | "
                     f"{', '.join(_fmt(r['monitor_share']) for r in runs)} | "
                     f"{', '.join(_fmt(r['monitor_process_share']) for r in runs)} |")
    ratio = report.get("ratio") or {}
    if ratio.get("per_round"):
        lines += ["", f"Logged / unlogged peak: per round {ratio.get('per_round')}, median {_fmt(ratio.get('median'))} "
              f"(min {_fmt(ratio.get('min'))}, max {_fmt(ratio.get('max'))}); pooled over every run "
              f"{_fmt(ratio.get('pooled'))}. Spread of the runs: on {ratio.get('on_spread')}, off "
              f"{ratio.get('off_spread')}.", ""]
    cpu = report.get("cpu") or {}
    if cpu.get("cluster_cpu_us_per_request_on") is not None:
        lines += [f"The cluster's CPU per request at peak (median run, wrk excluded): "
                  f"{_fmt(cpu['cluster_cpu_us_per_request_on'])} µs with the log, "
                  f"{_fmt(cpu.get('cluster_cpu_us_per_request_off'))} µs without.", ""]
    s = report.get("sustained")
    if s:
        lines += [f"## {s['rate_rps']:.0f} req/s (80 % of the logged peak) for {s['minutes']:g} min, every row logged",
                  "", f"Load: {s.get('generator')}.", "",
                  "| minute | achieved req/s | p50 ms | p99 ms | max ms | statuses | errors |",
                  "|---:|---:|---:|---:|---:|---|---|"]
        for k, part in enumerate(s["parts"]):
            lat = part["latency_ms"]
            lines.append(f"| {k + 1} | {part['achieved_rps']:.0f} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} | "
                         f"{_fmt(lat['max'])} | {part['statuses']} | {part['errors'] or '-'} |")
        lines += ["", f"- answered 200: {s['answered_200']:,}; rows on disk once the buffers were empty: "
                  f"{s['rows_on_disk']:,} (missing {s['missing_rows']:,}); after the graceful stop: "
                  f"{s['rows_on_disk_after_stop']:,} (missing {s['missing_rows_after_stop']:,}); rows on disk past "
                  f"wrk's 200s (answers to requests in flight when a part ended, which wrk does not count; at most "
                  f"{s.get('in_flight_bound')}): {s.get('uncounted_in_flight_rows')}",
                  f"- dropped (fleet_prediction_log_dropped_total): {_fmt(s['dropped'])}; most rows buffered in a "
                  f"10 s sample: {_fmt(s['max_buffered_rows'])}",
                  f"- the cluster's CPU over the run: {s['cluster_cpu_s']:,.0f} s; the monitor's judgement "
                  f"(fleet_monitor_cpu_seconds_total) {_fmt(s['monitor_cpu_s'])} s = {_fmt(s['monitor_share'])} of it; "
                  f"the monitor actor's whole process {_fmt(s['monitor_process_cpu_s'])} s = "
                  f"{_fmt(s['monitor_process_share'])}", ""]
    lines += _goals_table(report.get("goals") or [])
    return "\n".join(lines) + "\n"
