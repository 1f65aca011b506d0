"""Figures and tables of `benchmarks.rollout_trials`: power, delays, false rollbacks, errors, routing and shadow cost.

Pure functions over the trials' records (no cluster, no clock): `summarise` gives per regression
the rollbacks (power, or false rollbacks for A/A) with Clopper-Pearson 95 % bounds, the delay in
canary requests (percentiles with undetected trials counted as never: a percentile that falls on
one is None), exposure and client-visible errors; `goals` the issue's goals against them;
`markdown` the tables benchmarks/README.md quotes; `plot_delays` each regression's delay ECDF.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.judge_report import clopper_pearson

__all__ = ["summarise", "goals", "markdown", "plot_delays", "percentile", "ROUTING_GOAL", "SHADOW_GOAL",
           "FALSE_ROLLBACK_GOAL", "PROMOTION_GOAL_S"]

ROUTING_GOAL = 0.02  # peak throughput lost to a rollout in progress
SHADOW_GOAL = 0.05  # stable-path p99 added by shadowing every request
FALSE_ROLLBACK_GOAL = 0.01
PROMOTION_GOAL_S = 300.0  # a good version from its first stage to 100 % at 200 req/s


def percentile(values, q: float) -> float | None:
    """The q-th percentile (method "higher") with undetected trials as +inf; None when it falls on one."""
    arr = np.asarray(values, dtype=float)
    if not arr.size:
        return None
    v = float(np.percentile(arr, q, method="higher"))
    return None if np.isinf(v) else v


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def summarise(types: list[dict], trials: list[dict]) -> dict:
    """Per trial type ({"name", "title", "goal", "horizon"}): decisions, power or false rollbacks, delays, exposure."""
    out = {}
    for t in types:
        rows = [r for r in trials if r["type"] == t["name"]]
        n = len(rows)
        if not n:
            continue
        decisions = Counter(r["decision"] for r in rows)
        rolled = [r for r in rows if r["decision"] == "rollback"]
        # A candidate rolled back because it failed to load never met traffic: not a delay of the judge's.
        on_traffic = [r for r in rows if (r.get("rejected_by") or []) != ["load"]]
        delays = [r["canary_requests"] if r["decision"] == "rollback" else np.inf for r in on_traffic]
        entry = {"title": t["title"], "goal": t.get("goal"), "horizon": t.get("horizon"), "trials": n,
                 "decisions": dict(decisions), "rolled_back": len(rolled), "share": len(rolled) / n,
                 "failed_to_load": n - len(on_traffic), "on_traffic": len(on_traffic),
                 "share_ci95": clopper_pearson(len(rolled), n),
                 "gates": dict(Counter(g for r in rolled for g in r.get("rejected_by") or [])),
                 "delay_p50": percentile(delays, 50), "delay_p90": percentile(delays, 90),
                 "delay_p95": percentile(delays, 95),
                 "delay_max_detected": max(_finite(r["canary_requests"] for r in rolled), default=None),
                 "exposure_p50": percentile([r["exposure"] for r in rows if r.get("exposure") is not None], 50),
                 "exposure_max": max(_finite(r.get("exposure") for r in rows), default=None),
                 "client_errors": sum(r["client_non200"] for r in rows),
                 "client_requests": sum(r["client_requests"] for r in rows),
                 "answered_by_candidate": sum(r["client_by_candidate"] for r in rows)}
        if t.get("goal") is not None:
            m = len(on_traffic)
            within = sum(1 for d in delays if d <= t["goal"])
            entry.update(within_goal=within, within_goal_share=within / m if m else 0.0,
                         within_goal_ci95=clopper_pearson(within, m) if m else [0.0, 1.0],
                         met=entry["delay_p95"] is not None and entry["delay_p95"] <= t["goal"])
        else:
            entry["false_rollback_upper95"] = clopper_pearson(len(rolled), n)[1]
            took = [r["start_to_decision_s"] for r in rows if r["decision"] == "promote"]
            entry.update(promote_s_p50=percentile(took, 50), promote_s_p95=percentile(took, 95),
                         promote_s_max=max(took, default=None),
                         promoted_within_goal=sum(1 for s in took if s <= PROMOTION_GOAL_S))
        ratios = _finite(r.get("latency_ratio") for r in rows)
        if ratios and t["name"].startswith("latency"):
            p50s = _finite(r.get("arms_p50_ratio") for r in rows)
            its = [r["slow"]["iterations"] for r in rows if r.get("slow")]
            entry.update(latency_ratio_p50=float(np.median(ratios)), latency_ratio_min=min(ratios),
                         latency_ratio_max=max(ratios), arms_p50_ratio_p50=float(np.median(p50s)) if p50s else None,
                         iterations_min=min(its, default=None), iterations_max=max(its, default=None))
        out[t["name"]] = entry
    return out


def _routings(report: dict) -> list[dict]:
    """The routing probes (one per weight; a report of an older run held one, at 50 %)."""
    routing = report.get("routing") or []
    return [{"weight": 0.5, **routing}] if isinstance(routing, dict) else routing


def _goal(name: str, value, target, met, unit: str = "", note: str = "") -> dict:
    return {"goal": name, "value": value, "target": target, "unit": unit, "met": met, "note": note}


def goals(report: dict) -> list[dict]:
    """The issue's goals against this run's figures (met None where the run cannot tell)."""
    s, out = report.get("summary") or {}, []
    for name, e in s.items():
        if e.get("goal") is None:
            continue
        out.append(_goal(f"{e['title']}: rolled back within {e['goal']:,} canary requests (p95)", e["delay_p95"],
                         e["goal"], e["met"], "canary requests",
                         f"{e['rolled_back']} of {e['trials']} rolled back; {e['within_goal']} within the goal"))
    aa = s.get("aa")
    if aa:
        upper = aa["false_rollback_upper95"]
        met = True if upper <= FALSE_ROLLBACK_GOAL else (False if aa["rolled_back"] / aa["trials"] >
                                                         FALSE_ROLLBACK_GOAL and clopper_pearson(
                                                             aa["rolled_back"], aa["trials"])[0] > FALSE_ROLLBACK_GOAL
                                                         else None)
        out.append(_goal("A/A: false rollbacks", f"{aa['rolled_back']} of {aa['trials']} (95 % upper {upper:.3f})",
                         "<= 1 %", met, "", "n/a: the 95 % upper bound is above 1 %, too few trials to show the rate "
                         "is under it (`benchmarks.judge_trials` replays thousands)" if met is None else ""))
        if aa.get("promote_s_p95") is not None or aa["decisions"].get("promote"):
            out.append(_goal("A/A: a good version 1 % -> 100 % (s, p95)", aa.get("promote_s_p95"), PROMOTION_GOAL_S,
                             aa.get("promote_s_p95") is not None and aa["promote_s_p95"] <= PROMOTION_GOAL_S, "s",
                             f"{aa['decisions'].get('promote', 0)} of {aa['trials']} promoted"))
    errors = sum(e["client_errors"] for e in s.values())
    requests = sum(e["client_requests"] for e in s.values())
    out.append(_goal("client-visible errors (non-200 answers) during the trials", errors, 0, errors == 0, "",
                     f"of {requests:,} requests"))
    for routing in _routings(report):
        if routing.get("loss") is not None:
            out.append(_goal(f"canary routing: peak throughput lost with a rollout at {100 * routing['weight']:g} % "
                             f"({routing.get('model', 'fraud')})",
                             routing["loss"], ROUTING_GOAL, routing["loss"] <= ROUTING_GOAL, "share"))
    shadow = report.get("shadow") or {}
    if shadow.get("p99_increase") is not None:
        out.append(_goal("shadow (share 1.0): stable-path p99 increase", shadow["p99_increase"], SHADOW_GOAL,
                         shadow["p99_increase"] <= SHADOW_GOAL, "share"))
        out.append(_goal("shadow: answers not from the stable version", shadow["not_stable"], 0,
                         shadow["not_stable"] == 0, "", f"of {shadow['requests']:,} requests"))
    leak = report.get("leak") or {}
    if leak:
        out.append(_goal("shadow at peak: answers not from the stable version in 10^6 requests", leak["not_stable"],
                         0, leak["not_stable"] == 0 and leak["requests"] >= 1_000_000, "",
                         f"of {leak['requests']:,} requests (wrk, 64 connections), {leak['non200']} non-200"))
    return out


def _num(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:,.{digits}f}"


def _ci(share: float, ci: list[float]) -> str:
    return f"{100 * share:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(report: dict) -> str:
    """The run's tables (what summary.md holds and benchmarks/README.md quotes)."""
    s, cfg = report.get("summary") or {}, report["config"]
    lines = [f"# fleet rollout trials, git {report.get('git_sha')}, {report.get('created_at')}", "",
             f"One cluster; {cfg['rate_rps']:g} single-row requests/s per lane model (distinct ids, open loop), "
             f"{cfg['aa_lanes']} A/A lane(s) with the default stages, {cfg['fault_lanes']} fault lane(s) with "
             f"stages {cfg['fault_stages']} % (the stage never passes: a candidate not rolled back is aborted at its "
             f"horizon and counts as held); {cfg['trials_per_type']} trials asked per type, "
             f"{report.get('trials_minutes', 0):.0f} min of trials.", "",
             "| regression | trials | decisions | rolled back [95 % CI] | canary requests to rollback p50 | p90 | "
             "p95 | max | goal (p95) | within goal [95 % CI] | gate | exposure p50 / max | client errors | |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---|"]
    for name, e in s.items():
        if e.get("goal") is None:
            continue
        met = "met" if e["met"] else "**missed**"
        gates = ", ".join(f"{g} {k}" for g, k in sorted(e["gates"].items(), key=lambda x: -x[1])) or "–"
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(e["decisions"].items()))
        lines.append(f"| {e['title']} | {e['trials']} | {decisions} | {_ci(e['share'], e['share_ci95'])} | "
                     f"{_num(e['delay_p50'])} | {_num(e['delay_p90'])} | {_num(e['delay_p95'])} | "
                     f"{_num(e['delay_max_detected'])} | {e['goal']:,} | "
                     f"{_ci(e['within_goal_share'], e['within_goal_ci95'])} | {gates} | "
                     f"{_num(e['exposure_p50'])} / {_num(e['exposure_max'])} | {e['client_errors']} | {met} |")
    lines += ["", "Canary requests to rollback: the candidate's requests the controller had judged when it rolled "
              "back (the decision's audit record); a percentile that falls on a trial not rolled back shows as –. "
              "Exposure: the candidate's requests the replicas ran in the trial, the stragglers after the decision "
              "included (`fleet_inference_request_success` + `_failure` of its version)."]
    lat = s.get("latency_1.5x")
    if lat and lat.get("latency_ratio_p50") is not None:
        lines.append(f"Latency trials: the candidate's mean server latency / stable's over each trial: median "
                     f"{lat['latency_ratio_p50']:.2f}, {lat['latency_ratio_min']:.2f} to {lat['latency_ratio_max']:.2f}; "
                     f"the judge's p50 bucket, candidate / stable, at the decision: median "
                     f"{_num(lat.get('arms_p50_ratio_p50'), 2)} (asked: {cfg.get('slow', {}).get('target_ratio')} x; "
                     f"{_num(lat.get('iterations_min'))} to {_num(lat.get('iterations_max'))} rounds of the Slow loop, "
                     "set per trial from stable's latency of the 5 s before it).")
    loads = {e["title"]: e["failed_to_load"] for e in s.values() if e.get("failed_to_load")}
    if loads:
        lines.append("Rolled back because the candidate failed to load (no traffic; left out of the delays and the "
                     f"within-goal share): {loads}.")
    aa = s.get("aa")
    if aa:
        lines += ["", "| A/A (identical copy, stages 1, 5, 20, 50, 100) | trials | promoted | false rollbacks "
                  "[95 % CI] | held | 1 % -> 100 % p50 / p95 / max (s) | within 300 s | gate | client errors |",
                  "|---|---:|---:|---|---:|---|---:|---|---:|"]
        gates = ", ".join(f"{g} {k}" for g, k in aa["gates"].items()) or "–"
        lines.append(f"| candidate = stable | {aa['trials']} | {aa['decisions'].get('promote', 0)} | "
                     f"{aa['rolled_back']}: {_ci(aa['share'], aa['share_ci95'])} | "
                     f"{aa['decisions'].get('held', 0)} | {_num(aa.get('promote_s_p50'))} / "
                     f"{_num(aa.get('promote_s_p95'))} / {_num(aa.get('promote_s_max'))} | "
                     f"{aa.get('promoted_within_goal', 0)} | {gates} | {aa['client_errors']} |")
    for routing in _routings(report):
        lines += ["", f"Canary routing cost at {100 * routing['weight']:g} % on {routing.get('model', 'fraud')} (wrk, "
                  "closed loop, 64 connections, one-row JSON, ABAB):", "", "| | runs (req/s) | median |", "|---|---|---:|"]
        for phase in ("idle", "rollout"):
            runs = routing.get(phase) or []
            lines.append(f"| {phase} | {', '.join(f'{r:,.0f}' for r in runs)} | "
                         f"{_num(routing.get(phase + '_median'))} |")
        batches = routing.get("rows_per_batch")
        if batches:
            lines.append(f"\nRows per model execution (all versions, from /metrics): idle "
                         f"{', '.join(_num(x, 2) for x in batches['idle'])}; rollout "
                         f"{', '.join(_num(x, 2) for x in batches['rollout'])}.")
        for e in routing.get("false_rollbacks") or []:
            lines.append(f"\nIdentical version {e['version']} ended by the judge during the runs ({e['event']}): "
                         f"{e['reason']} (its runs left out).")
        if routing.get("loss") is None:
            lines.append("\nNo round kept the rollout through its runs: no loss measured.")
        else:
            lines.append(f"\nLoss: {100 * routing['loss']:.1f} % (1 - rollout / idle median; per round "
                         f"{', '.join(f'{100 * x:.1f} %' for x in routing.get('round_losses', []))}); the candidate "
                         f"answered {_num(100 * routing['candidate_share'], 1) if routing.get('candidate_share') is not None else '–'} "
                         "% of the rollout runs' requests.")
    shadow = report.get("shadow") or {}
    if shadow:
        lines += ["", f"Shadow overhead (open loop, {shadow['rate_rps']:g} single-row requests/s, "
                  f"{shadow['segment_s']:g} s segments, {shadow.get('rounds', 1)} round(s) of ABBA):", "",
                  "| segment | requests | p50 ms | p99 ms | not from stable | non-200 | shadow pairs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for seg in shadow["segments"]:
            lines.append(f"| {seg['phase']} | {seg['requests']:,} | {seg['p50_ms']:.2f} | {seg['p99_ms']:.2f} | "
                         f"{seg['not_stable']} | {seg['non200']} | {_num(seg.get('shadow_pairs'))} |")
        if shadow.get("pooled_p99_ms"):
            lines.append(f"\nAll segments of a phase pooled: p50 {shadow['pooled_p50_ms']['no rollout']:.2f} ms "
                         f"without, {shadow['pooled_p50_ms']['shadow']:.2f} ms with shadow; p99 "
                         f"{shadow['pooled_p99_ms']['no rollout']:.2f} ms without, "
                         f"{shadow['pooled_p99_ms']['shadow']:.2f} ms with.")
        for e in shadow.get("ended_by_judge") or []:
            lines.append(f"\nThe judge ended the shadow rollout of identical version {e['version']} by itself "
                         f"({e['event']}, {e['after_s']} s into a segment): {e['reason']}; pairs "
                         f"{(e.get('shadow') or {}).get('pairs')}, candidate-only failures "
                         f"{(e.get('shadow') or {}).get('candidate_only_failed')}, shed "
                         f"{(e.get('shadow') or {}).get('shed')}.")
        lines.append(f"\np99 with shadow / without: {shadow['p99_ratio']:.3f} (increase "
                     f"{100 * shadow['p99_increase']:.1f} %); answers not from the stable version: "
                     f"{shadow['not_stable']} of {shadow['requests']:,}.")
    leak = report.get("leak") or {}
    if leak:
        rates = ", ".join(f"{c['throughput_rps']:,.0f}" for c in leak["chunks"])
        lines.append(f"\nShadow at peak (wrk, 64 connections, share 1.0, {len(leak['chunks'])} runs): "
                     f"{leak['requests']:,} answers, by version {leak['by_version']}, non-200 {leak['non200']}; "
                     f"{rates} req/s; shadow pairs "
                     f"{sum(c['shadow_pairs'] for c in leak['chunks']):,}, shed at the end {leak['chunks'][-1]['shed']}"
                     f"; shadow rollouts started again {leak['restarted']}.")
    lines += ["", "| goal | value | target | met | |", "|---|---|---|---|---|"]
    for g in report.get("goals") or []:
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "**missed**")
        value = f"{g['value']:.4f}" if isinstance(g["value"], float) and g["unit"] == "share" else _num(g["value"])
        lines.append(f"| {g['goal']} | {value} | {_num(g['target'], 2 if isinstance(g['target'], float) and g['target'] < 1 else 0)} | {met} | {g['note']} |")
    return "\n".join(lines) + "\n"


def plot_delays(report: dict, path: Path) -> Path:
    """One panel per regression: the share of trials rolled back by a delay in canary requests, and the goal."""
    from benchmarks.plots import _figure, _save

    s = {k: v for k, v in (report.get("summary") or {}).items() if v.get("goal") is not None}
    fig = _figure(4.0 * max(len(s), 1), 3.6)
    axes = fig.subplots(1, max(len(s), 1), squeeze=False)[0]
    for ax, (name, e) in zip(axes, s.items()):
        rows = [r for r in report["trials"] if r["type"] == name]
        delays = sorted(r["canary_requests"] for r in rows if r["decision"] == "rollback")
        n = len(rows)
        if delays:
            xs = [d for d in delays for _ in (0, 1)]
            ys = [y for i in range(len(delays)) for y in (i / n, (i + 1) / n)]
            ax.plot(xs, ys, color="C0", label="rolled back by then")
        ax.axvline(e["goal"], color="red", lw=1, label=f"goal {e['goal']:,}")
        ax.axhline(0.95, color="0.5", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        ax.set_xscale("log")
        ax.set_title(f"{e['title']} ({n} trials)", fontsize=9)
        ax.set_xlabel("canary requests")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of trials")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Rollbacks on a live cluster, git {str(report.get('git_sha'))[:12]}", fontsize=10)
    return _save(fig, path)
