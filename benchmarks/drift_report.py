"""The drift benchmark's summary.md (goals met or missed, then every table) and delays.png (delay ECDFs).

Reads the report dict `benchmarks.drift_trials.run` builds; a section missing (failed or not
run) is skipped, not drawn as zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["goals", "markdown", "plot_delays"]


def _f(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    if isinstance(value, (int, float)) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _share(summary: dict) -> str:
    g = summary.get("within_goal")
    if not g:
        return "–"
    return f"{g['share'] * 100:.1f} % [{g['ci95'][0] * 100:.1f}, {g['ci95'][1] * 100:.1f}]"


def goals(report: dict) -> list[dict]:
    """The issue's goals against the measured figures: value, target, met."""
    s = report["sections"]
    out = []

    def goal(name, value, target, met):
        out.append({"goal": name, "value": value, "target": target, "met": met})

    v3 = s.get("shift_0.1sd_V3", {}).get("summary")
    if v3:
        g = v3["within_goal"]
        goal("0.1 sd shift of V3 flagged within 20,000 rows (share, 95 % CI)", _share(v3), ">= 99 %",
             g["share"] >= 0.99)
        goal("0.1 sd shift of V3: median delay (rows)", v3["median"], "<= 10,000",
             v3["median"] is not None and v3["median"] <= 10_000)
    replay = s.get("stable_replay")
    if replay:
        goal(f"false alarms in {replay['rows']:,} replayed stable rows", replay["alarms"], "0", replay["alarms"] == 0)
    cal = s.get("calibration", {}).get("target")
    if cal:
        goal(f"false alarms per 864 M rows (95 % upper bound; {cal['multiples_of_target']:.1f} x 864 M simulated)",
             f"{cal['alarms_per_target_rows']:.3g} (<= {cal['upper95_per_target_rows']:.3g})", "<= 1",
             cal["upper95_per_target_rows"] <= 1.0)
    corr = s.get("correlation_shift")
    if corr:
        g = corr["summary"]["within_goal"]
        goal("correlation-only shift flagged by the PCA stream within 50,000 rows", _share(corr["summary"]), "100 %",
             g["share"] == 1.0)
        goal("correlation-only shift: alarms of the 30 feature streams", corr["feature_stream_alarms"], "0",
             corr["feature_stream_alarms"] == 0)
    lab = s.get("labels")
    if lab:
        f = lab["fleet"]["summary"]
        goal("label error 5 % -> 10 %: median delay (labels)", f["median"], "<= 1,000",
             f["median"] is not None and f["median"] <= 1_000)
        goal("label error 5 % -> 10 %: share flagged within 1,000 labels", _share(f), "–", None)
        st = lab["stable"]
        per = st["labels_per_trial"]
        goal(f"label false alarms per stream of {per / 1e6:g} M stable labels (mean over {st['trials']} streams; "
             f"95 % upper)", f"{st['alarms'] / st['trials']:.3g} (<= {st['upper95_per_million'] * per / 1e6:.2g}); "
             f"{st['alarms']} in {st['labels'] / 1e6:,.0f} M", "0", st["alarms"] == 0)
    cost = s.get("cost")
    if cost:
        goal("drift computation per step, 32 streams (µs; share of a core at 1 step/s)",
             f"{cost['median_us_per_step']:.0f} µs ({cost['core_share_at_1_step_per_s'] * 100:.3f} %)", "<= 1 %",
             cost["core_share_at_1_step_per_s"] <= 0.01)
    return out


def _delay_row(name: str, summary: dict, extra: str = "") -> str:
    return (f"| {name} | {summary['trials']} | {_f(summary['median'])} | {_f(summary['p90'])} | {_f(summary['p99'])} "
            f"| {_f(summary['max'])} | {_share(summary)} | {summary['missed']} | {extra} |")


def markdown(report: dict) -> str:
    s = report["sections"]
    lines = [f"# Drift detection trials ({'quick' if report.get('quick') else 'full'} run)", "",
             f"git {report.get('git_sha')}, native kernels: {report.get('native_backend')}, "
             f"started {report.get('started')}", "", "## Goals", "", "| goal | measured | target | |",
             "|---|---|---|---|"]
    for g in goals(report):
        verdict = "" if g["met"] is None else ("met" if g["met"] else "**missed**")
        lines.append(f"| {g['goal']} | {_f(g['value'])} | {g['target']} | {verdict} |")
    head = ["", "| onsets | trials | median | p90 | p99 | max | share within goal [95 % CI] | missed "
                "| first detector |",
            "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    rows = []
    for key, label in (("shift_0.1sd_V3", "0.1 sd, V3"), ("shift_0.3sd_V3", "0.3 sd, V3")):
        if key in s:
            rows.append(_delay_row(label, s[key]["summary"], str(s[key]["first_detector"])))
    for feature, r in s.get("shift_0.1sd_other", {}).items():
        rows.append(_delay_row(f"0.1 sd, {feature}", r["summary"], str(r["first_detector"])))
    for d, summary in s.get("design_shift_sweep", {}).items():
        rows.append(_delay_row(f"0.1 sd, V3, d* = {d}", summary, str(summary.get("first_detector", ""))))
    if "correlation_shift" in s:
        c = s["correlation_shift"]
        rows.append(_delay_row("correlation only (PCA stream; goal 50,000)", c["summary"], str(c["first_detector"])))
    if rows:
        lines += ["", "## Detection delay in rows after the onset (goal 20,000 unless stated)"] + head + rows
    if "correlation_shift" in s:
        lines += ["", f"Correlation-only shift, alarms per stream after the onset (to 60,000 rows): "
                      f"{s['correlation_shift']['alarms_after_onset']}"]
    lab = s.get("labels")
    if lab:
        lines += ["", "## Label error 5 % -> 10 % (delay in labels; goal 1,000)", "",
                  "| detector | median | p90 | p99 | share within 1,000 [95 % CI] | missed "
                  "| false alarms before onsets "
                  "| false alarms per 1 M stable labels |", "|---|---:|---:|---:|---|---:|---:|---:|"]
        st = lab["stable"]
        for key, name, per in (("fleet", "fleet (baseline of 8,000 labels)",
                                f"{st['per_million_labels']:.3g} (<= {st['upper95_per_million']:.2g}; "
                                f"{st['labels'] / 1e6:,.0f} M labels)"),
                               ("fleet_burn_in", "fleet (no baseline: burn-in)", "–")):
            r = lab[key]
            q = r["summary"]
            lines.append(f"| {name} | {_f(q['median'])} | {_f(q['p90'])} | {_f(q['p99'])} | {_share(q)} | "
                         f"{q['missed']} | {r['false_alarms_before_onset']} | {per} |")
        for name, r in lab.get("river", {}).items():
            q = r["summary"]
            lines.append(f"| {r['detector']} | {_f(q['median'])} | {_f(q['p90'])} | {_f(q['p99'])} | {_share(q)} | "
                         f"{q['missed']} | {r['false_alarms_before_onset']} | "
                         f"{r['stable']['per_million_labels']:.3g} ({r['stable']['labels'] / 1e6:g} M labels) |")
        if lab.get("design_sweep"):
            lines += ["", "Label design sweep (h = ln target; z of the baseline's Wilson bound):", "",
                      "| target (labels) | z | median | p90 | p99 | share within 1,000 "
                      "| false alarms (stable labels) |",
                      "|---:|---:|---:|---:|---:|---|---|"]
            for r in lab["design_sweep"]:
                q = r["summary"]
                lines.append(f"| {r['false_alarm_labels']:.0e} | {r['baseline_margin_sd']} | {_f(q['median'])} | "
                             f"{_f(q['p90'])} | {_f(q['p99'])} | {_share(q)} | "
                             f"{r['stable_alarms'] + r['false_alarms_before_onset']} "
                             f"({r['stable_labels'] / 1e6:g} M) |")
        for r in lab.get("looser_targets", []):
            lines.append(f"\nAt a looser target of one per {1e6 / r['target_per_million']:,.0f}"
                         f" labels: {r['per_million_labels']:.3g} per 1 M labels (95 % upper "
                         f"{r['upper95_per_million']:.3g}; target {r['target_per_million']:.3g}).")
    cal = s.get("calibration")
    if cal:
        lines += ["", "## False-alarm calibration (multinomial simulation, fresh reference per version)", "",
                  "| target F (rows) | rows per step | simulated rows | x F | alarms | per F rows | 95 % upper "
                  "| by detector |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in [cal["target"], *cal.get("looser", [])]:
            lines.append(f"| {r['false_alarm_rows']:,.0f} | {r['step_rows']:,} | {r['rows']:,.0f} | "
                         f"{r['multiples_of_target']:.1f} | "
                         f"{r['alarms']} | {r['alarms_per_target_rows']:.3g} | {r['upper95_per_target_rows']:.3g} | "
                         f"{r['by_detector']} |")
    chi = s.get("chi2_exceedance")
    if chi:
        lines += ["", "## chi^2 thresholds: exceedance rate / alpha (PSI; JS distance)", "",
                  "| stream | window rows | alpha 1e-3 | alpha 1e-4 | alpha 1e-5 |", "|---|---:|---|---|---|"]
        for stream, by_n in chi.items():
            for n, by_a in by_n.items():
                cells = [f"{v['psi_rate_over_alpha']:.2f}; {v['js_rate_over_alpha']:.2f}" for v in by_a.values()]
                lines.append(f"| {stream} | {int(n):,} | " + " | ".join(cells) + " |")
    cus = s.get("cusum_exceedance")
    if cus:
        lines += ["", "## Ridit CUSUMs: false crossings per row against Lorden's bound e^-h", "",
                  "| h | " + " | ".join(next(iter(cus.values())).keys()) + " |",
                  "|---:|" + "---|" * len(next(iter(cus.values())))]
        for h, kinds in cus.items():
            cells = [f"{k['rate_per_row']:.2g} (≤ {k['upper95_per_row']:.2g}) / {k['bound_per_row']:.2g}"
                     for k in kinds.values()]
            lines.append(f"| {h} | " + " | ".join(cells) + " |")
    anchor = s.get("fixed_psi_anchor")
    if anchor:
        lines += ["", f"## Anchor: {anchor['rule']}", ""]
        for size, r in anchor["stable"].items():
            lines.append(f"- stable windows of {int(size):,} rows: {r['alarm_share_per_stream_window'] * 100:.2f} % of "
                         f"stream-windows over 0.1, {r['windows_with_any_alarm'] * 100:.1f} % of windows with an alarm "
                         f"on some stream ({r['windows']} windows x {r['streams']} streams)")
        for shift, r in anchor["shifted"].items():
            lines.append(f"- {shift} sd shift of {anchor['feature']}, windows of 10,000 rows: power "
                         f"{r['power'] * 100:.0f} %, median PSI {r['median_psi']:.3f}, expected delay "
                         f"{_f(r['expected_delay_rows'])} rows")
    ph = s.get("page_hinkley_anchor")
    if ph:
        lines.append(f"- {ph['detector']} on {ph['stream']}: {ph['detections']} detections in {ph['rows']:,} rows")
    replay = s.get("stable_replay")
    if replay:
        lines += ["", f"Stable replay: {replay['alarms']} alarms in {replay['rows']:,} rows "
                      f"({replay['steps']:,} steps; streams {replay['alarm_streams']})."]
    cost = s.get("cost")
    if cost:
        lines.append(f"Cost: {cost['median_us_per_step']:.0f} µs per step of {cost['streams']} streams (min "
                     f"{cost['min_us']:.0f}), {cost['steps_per_s_per_core']:,.0f} version-steps per second per core.")
    for e in report.get("errors", []):
        lines.append(f"\nError in {e['section']}: {e['error']}")
    lines.append("\nSeconds per section: " + ", ".join(f"{k} {v}" for k, v in report.get("seconds", {}).items()))
    return "\n".join(lines) + "\n"


def _ecdf(ax, delays, label, scale=1.0):
    d = np.sort([x / scale for x in delays if x is not None])
    if d.size == 0:
        return
    n = len(delays)
    ax.step(d, np.arange(1, d.size + 1) / n, where="post", label=f"{label} (n={n})")


def plot_delays(report: dict, path: Path) -> Path:
    """Four ECDF panels: 0.1 sd V3 and its design-shift sweep; other features; correlation-only; label errors."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = report["sections"]
    fig = Figure(figsize=(12, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    if "shift_0.1sd_V3" in s:
        _ecdf(ax, s["shift_0.1sd_V3"]["delays"], "0.1 sd, V3", 1e3)
    if "shift_0.3sd_V3" in s:
        _ecdf(ax, s["shift_0.3sd_V3"]["delays"], "0.3 sd, V3", 1e3)
    ax.axvline(20, color="k", ls="--", lw=1, label="goal: 20k rows")
    ax.axvline(10, color="0.5", ls=":", lw=1, label="goal: median 10k")
    ax.set(title="mean shift of V3", xlabel="delay after onset (thousand rows)", ylabel="share of onsets flagged")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for feature, r in s.get("shift_0.1sd_other", {}).items():
        _ecdf(ax, r["delays"], feature, 1e3)
    ax.axvline(20, color="k", ls="--", lw=1)
    ax.set(title="0.1 sd mean shift, other features", xlabel="delay (thousand rows)", ylabel="share flagged")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    if "correlation_shift" in s:
        _ecdf(ax, s["correlation_shift"]["delays"], "PCA stream", 1e3)
    ax.axvline(50, color="k", ls="--", lw=1, label="goal: 50k rows")
    ax.set(title="correlation-only shift (feature streams: "
           f"{s.get('correlation_shift', {}).get('feature_stream_alarms', '–')} alarms)",
           xlabel="delay (thousand rows)", ylabel="share flagged")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    lab = s.get("labels", {})
    if lab:
        _ecdf(ax, lab["fleet"]["delays"], "fleet CUSUM")
        _ecdf(ax, lab["fleet_burn_in"]["delays"], "fleet, burn-in baseline")
        for name, r in lab.get("river", {}).items():
            _ecdf(ax, r["delays"], f"river {name}")
        ax.set_xscale("log")
    ax.axvline(1000, color="k", ls="--", lw=1, label="goal: 1,000 labels")
    ax.set(title="label error 5 % -> 10 %", xlabel="delay (labels, log)", ylabel="share flagged")
    ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
