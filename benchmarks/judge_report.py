"""Figures and tables of `benchmarks.judge_trials`: power, delays, false rollbacks, goals.

`summarise` turns the trials' outcomes into per-scenario figures (Clopper-Pearson 95 % bounds on
every share); `markdown` renders the report's tables as benchmarks/README.md quotes them;
`plot_delays` draws each regression's delay ECDF against its goal.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import beta

__all__ = ["clopper_pearson", "summarise", "markdown", "plot_delays"]


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Exact two-sided `level` confidence interval of a binomial share k / n."""
    a = (1 - level) / 2
    lo = float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    hi = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return [lo, hi]


def _pct(values: np.ndarray, q: float) -> float | None:
    """Percentile with undetected trials as +inf: None when it falls on one (not reached in the horizon)."""
    v = float(np.percentile(values, q, method="higher"))
    return None if np.isinf(v) else v


def summarise(scenarios, results: list[dict]) -> dict:
    """Per scenario: trials, rollbacks (power or false rollbacks) with bounds, delays, gates, stages passed."""
    out = {}
    for s in scenarios:
        rows = [r for r in results if r["scenario"] == s.name]
        n = len(rows)
        if not n:
            continue
        hit = [r for r in rows if r["rolled_back"]]
        key = "labelled_pairs" if s.unit == "labelled pairs" else "canary_requests"
        delays = np.array([r[key] if r["rolled_back"] else np.inf for r in rows], dtype=float)
        canary = np.array([r["canary_requests"] if r["rolled_back"] else np.inf for r in rows], dtype=float)
        entry = {"title": s.title, "unit": s.unit, "goal": s.goal, "power_goal": s.power_goal, "trials": n,
                 "rolled_back": len(hit), "share": len(hit) / n, "share_ci95": clopper_pearson(len(hit), n),
                 "gates": dict(Counter(g for r in hit for g in r["gates"])),
                 "passed_a_stage_first": sum(1 for r in hit if r["stages_passed"] > 0),
                 "stages_passed_median": float(np.median([r["stages_passed"] for r in rows])),
                 "ticks_median": float(np.median([r["ticks"] for r in rows]))}
        if hit:
            d = delays[np.isfinite(delays)]
            entry.update(delay_median=_pct(delays, 50), delay_p95=_pct(delays, 95), delay_max_detected=float(d.max()),
                         canary_median=_pct(canary, 50), canary_p95=_pct(canary, 95))
        if s.goal is not None:
            within = int((delays <= s.goal).sum())
            p95 = entry.get("delay_p95")
            entry.update(within_goal=within, within_goal_share=within / n,
                         within_goal_ci95=clopper_pearson(within, n),
                         met=bool(p95 is not None and p95 <= s.goal and entry["share"] >= s.power_goal))
        else:
            entry["false_rollback_upper95"] = clopper_pearson(len(hit), n)[1] if s.name.startswith("aa") else None
        if any("oracle_pairs" in r for r in rows):
            oracle = np.array([np.inf if r["oracle_pairs"] is None else r["oracle_pairs"] for r in rows], dtype=float)
            entry.update(oracle_median=_pct(oracle, 50), oracle_p95=_pct(oracle, 95))
        if s.false_rollback_rate is not None:
            entry["false_rollback_rate"] = s.false_rollback_rate
        out[s.name] = entry
    return out


def _num(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _share(entry: dict, key: str = "share", ci: str = "share_ci95") -> str:
    lo, hi = entry[ci]
    return f"{100 * entry[key]:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(report: dict) -> str:
    """The tables: goals per regression, the A/A false rollbacks, the judge's CPU per tick."""
    summary, settings = report["summary"], report["settings"]
    shares = ", ".join(f"{g} {a:.3g}" for g, a in report["gate_alphas"].items())
    lines = [f"Settings: false_rollback_rate {settings['false_rollback_rate']} split over "
             f"{len(report['active_gates'])} gates by weight ({shares}), "
             f"min_stage_requests {settings['min_stage_requests']}, "
             f"min_stage_labels {settings['min_stage_labels']}, latency_baseline_requests "
             f"{settings['latency_baseline_requests']}, outputs_baseline_scores "
             f"{settings['outputs_baseline_scores']}; git {report['git_sha']}; {report['trials_per_scenario']} "
             f"trials per scenario, {report['seconds']} s on {report['workers']} processes.", "",
             "| regression in a candidate at 5 % | trials | rolled back (power) [95 % CI] | delay median | p95 | "
             "max | goal (p95) | within goal [95 % CI] | passed a stage first | gate | |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---|---|"]
    for name, e in summary.items():
        if name.startswith("aa"):
            continue
        unit = "pairs" if e["unit"] == "labelled pairs" else "req"
        goal = f"{_num(e['goal'])} {unit}" if e["goal"] is not None else "–"
        within = _share(e, "within_goal_share", "within_goal_ci95") if e["goal"] is not None else "–"
        met = "" if e["goal"] is None else ("met" if e["met"] else "**missed**")
        gates = ", ".join(f"{g} {k}" for g, k in sorted(e["gates"].items(), key=lambda x: -x[1]))
        lines.append(f"| {e['title']} | {e['trials']} | {_share(e)} | {_num(e.get('delay_median'))} | "
                     f"{_num(e.get('delay_p95'))} | {_num(e.get('delay_max_detected'))} | {goal} | {within} | "
                     f"{e['passed_a_stage_first']} | {gates} | {met} |")
    lines.append("")
    lines.append("Delays are in canary requests (labelled pairs for accuracy) up to and including the tick of the "
                 "rollback; a percentile that falls on an undetected trial shows as –.")
    acc = [e for e in summary.values() if e["unit"] == "labelled pairs" and e.get("canary_median") is not None]
    for e in acc:
        lines.append(f"- {e['title']}: canary requests to rollback median {_num(e['canary_median'])}, p95 "
                     f"{_num(e['canary_p95'])}; the oracle sign test (true b/c, same alpha) on the same pairs: "
                     f"median {_num(e.get('oracle_median'))}, p95 {_num(e.get('oracle_p95'))} pairs.")
    aa = summary.get("aa")
    if aa:
        lines += ["", "| A/A | trials | ticks each | canary requests each (median) | false rollbacks | "
                  "share [95 % CI] | goal | stages passed (median) |", "|---|---:|---:|---:|---:|---|---|---:|"]
        horizon = next(s["horizon_ticks"] for s in report["scenarios"] if s["name"] == "aa")
        canary = float(np.median([r["canary_total"] for r in report["trials"] if r["scenario"] == "aa"]))
        ok = "met" if aa["rolled_back"] == 0 else ("met (<= 1 %)" if aa["share_ci95"][1] <= 0.01 else "**missed**")
        lines.append(f"| candidate = stable | {aa['trials']} | {horizon:,} | {canary:,.0f} | {aa['rolled_back']} | "
                     f"{_share(aa)} | 0 of {aa['trials']} (<= 1 %): {ok} | {aa['stages_passed_median']:.0f} |")
        if aa["gates"]:
            lines.append(f"False rollbacks by gate: {aa['gates']}.")
    loose = summary.get("aa_loose")
    if loose:
        horizon = next(s["horizon_ticks"] for s in report["scenarios"] if s["name"] == "aa_loose")
        lines += ["", f"Calibration: A/A with false_rollback_rate {loose['false_rollback_rate']} over {horizon} ticks: "
                  f"{loose['rolled_back']} of {loose['trials']} rolled back, {_share(loose)} (the bound is "
                  f"{100 * loose['false_rollback_rate']:.0f} %); by gate {loose['gates'] or '{}'}."]
    cpu = report["cpu_us_per_tick"]
    lines += ["", f"Judge CPU per tick (thread CPU time of `Judge.update`, 4 gates, {cpu['ticks']:,} ticks): "
              f"mean {cpu['mean']:.0f} µs, p50 {cpu['p50']:.0f} µs, p99 {cpu['p99']:.0f} µs, max "
              f"{cpu['max']:.0f} µs."]
    return "\n".join(lines) + "\n"


def plot_delays(report: dict, path: Path) -> Path:
    """One panel per regression: the share of trials rolled back against the delay (ECDF), the goal
    dashed; for accuracy also the oracle sign test on the same pairs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [s for s in report["scenarios"] if not s["name"].startswith("aa")]
    rows = -(-len(shown) // 4)
    fig = Figure(figsize=(16, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 4, squeeze=False).ravel()
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax, s in zip(axes, shown):
        key = "labelled_pairs" if s["unit"] == "labelled pairs" else "canary_requests"
        trials = [r for r in report["trials"] if r["scenario"] == s["name"]]
        for label, values in (("judge", [r[key] for r in trials if r["rolled_back"]]),
                              ("oracle SPRT", [r["oracle_pairs"] for r in trials if r.get("oracle_pairs")])):
            if values:
                x = np.sort(np.asarray(values, float))
                ax.step(x, np.arange(1, x.size + 1) / len(trials), where="post", label=label)
        if s["goal"]:
            ax.axvline(s["goal"], color="k", ls="--", lw=1, label=f"goal {s['goal']:,}")
        ax.axhline(0.95, color="0.6", ls=":", lw=1)
        ax.set(title=s["title"], xlabel=s["unit"] + " to rollback", ylim=(0, 1.02))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path)
    return path
