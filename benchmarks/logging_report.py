"""The logging-cost benchmark's arithmetic: on/off throughput ratios with their spread, CPU shares, goals, markdown.

Pure functions over the recorded runs (see `benchmarks.logging_cost`), unit-tested in
`tests/unit/test_lifecycle_bench.py`.
"""

from __future__ import annotations

import statistics

from benchmarks.lifecycle_report import _fmt, _goal, _goals_table  # one goal shape and format for both reports

__all__ = ["pair_ratios", "cpu_share", "cost_goals", "cost_markdown", "COST_TARGET", "CPU_SHARE_TARGET"]

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


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    mid = statistics.median(values)
    return {"median": round(mid, 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "range_pct": round(100.0 * (max(values) - min(values)) / mid, 1) if mid else None}


def cost_goals(report: dict) -> list[dict]:
    """The logging benchmark's promises as goals (the shape of `benchmarks.report.ratios_and_goals`)."""
    goals = []
    ratio = report.get("ratio") or {}
    cost = ratio.get("cost")
    pct = None if cost is None else round(100 * cost, 2)
    goals.append(_goal(f"prediction log: cost in peak throughput (1 - median logged/unlogged over "
                       f"{len(ratio.get('per_round') or [])} rounds; per round {ratio.get('per_round')})",
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




def cost_markdown(report: dict) -> str:
    cfg = report.get("config") or {}
    lines = [f"# fleet prediction-log cost, git {report.get('git_sha')}, {report.get('created_at')}", "",
             f"wrk, {cfg.get('connections')} connections, one-row JSON bodies to `{report.get('model')}`, "
             f"{cfg.get('repeats')} runs of {cfg.get('duration')} s per cluster, clusters in ABBA order; load "
             f"average at the start {(report.get('machine') or {}).get('load_average')}.", "",
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
