"""The lifecycle scenario's timeline as one PNG (matplotlib's Agg canvas, no pyplot; see benchmarks.plots).

Panels, sharing the time axis (seconds from the load's start), with the onsets as vertical lines
and the retrain's submission and end as dotted ones:
1. drift statistics per version: the largest PSI / threshold (rows window) over the streams, the
   largest CUSUM / h, and the three streams that went highest; alarms raised as markers at 1;
2. how many streams are alarming, per version;
3. labels: the rows window's error rate, the label-error detector's recent error rate and its
   CUSUM / h (right axis); its alarms as markers;
4. online ROC AUC (rows window) per version, with the offline AUCs of the checkpoints;
5. the rollout: the candidate's weight as the controller set it (1, 5, 20, 50, 100 %), the
   share of requests each newer version actually answered (per 5 s), the stable version, and the
   prediction-log rows written per second.
The rollout's start, stages and decision are vertical lines too (green; red for a rollback).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.plots import _figure, _save

__all__ = ["plot_timeline"]

# Legends right of the panels (past a right-hand axis where there is one), so they hide no data.
_LEGEND_AT = ((1.01, 1.0), (1.07, 1.0))


def _series(timeline: list[dict], pick) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for snap in timeline:
        if "error" in snap:
            continue
        value = pick(snap)
        if value is not None:
            xs.append(snap["t"])
            ys.append(value)
    return xs, ys


def _live(timeline: list[dict], counter, lookback: int = 10) -> list[dict]:
    """The snapshots at which `counter(snapshot)` (a version's rows or labels) grew over the last `lookback`:
    a version's lines stop where it stopped getting traffic, instead of running on flat."""
    values = [counter(s) for s in timeline]
    return [snap for i, snap in enumerate(timeline)
            if values[i] is not None and values[i] > (values[max(0, i - lookback)] or 0)]


def _versions(timeline: list[dict], key: str) -> list[str]:
    found: set[str] = set()
    for snap in timeline:
        doc = snap.get(key) or {}
        found |= set(doc.get("versions") or {}) if key == "quality" else set(doc)
    return sorted(found, key=int)


def _max_ratio(streams: dict, index: int) -> float | None:
    values = [s[index] for s in streams.values() if s[index] is not None]
    return max(values) if values else None


def plot_timeline(data: dict, report: dict, path: str | Path) -> Path:
    timeline = [s for s in data.get("timeline", []) if "error" not in s]
    events = data.get("events", [])
    fig = _figure(15.0, 15.0)
    axes = fig.subplots(5, 1, sharex=True, height_ratios=[3, 1.3, 2, 1.6, 1.3])
    drift_ax, count_ax, label_ax, auc_ax, version_ax = axes
    floor = 1e-2
    all_snaps = timeline
    for i, version in enumerate(_versions(all_snaps, "drift")):
        color = f"C{i}"
        timeline = _live(all_snaps, lambda s, v=version: ((s.get("drift") or {}).get(v) or {}).get("rows"))
        streams_of = lambda s, v=version: ((s.get("drift") or {}).get(v) or {}).get("streams") or {}  # noqa: E731
        xs, ys = _series(timeline, lambda s: _max_ratio(streams_of(s), 1))
        drift_ax.plot(xs, [max(y, floor) for y in ys], "-", color=color, lw=1.8,
                      label=f"v{version}: max PSI / threshold (rows window)")
        xs, ys = _series(timeline, lambda s: _max_ratio(streams_of(s), 3))
        drift_ax.plot(xs, [max(y, floor) for y in ys], "--", color=color, lw=1.5, label=f"v{version}: max CUSUM / h")
        peak: dict[str, float] = {}
        for snap in timeline:
            for name, row in streams_of(snap).items():
                values = [v for v in (row[1], row[3]) if v is not None]
                if values:
                    peak[name] = max(peak.get(name, 0.0), max(values))
        for j, name in enumerate(sorted(peak, key=peak.get, reverse=True)[:3]):
            xs, ys = _series(timeline, lambda s, n=name: (streams_of(s).get(n) or [None, None])[1])
            drift_ax.plot(xs, [max(y, floor) for y in ys], ":", color=color, lw=0.9, alpha=0.8,
                          label=f"v{version}: {name} PSI / threshold")
        xs, ys = _series(timeline, lambda s: len(((s.get("drift") or {}).get(version) or {}).get("alarming") or [])
                         if version in (s.get("drift") or {}) else None)
        count_ax.step(xs, ys, where="post", color=color, label=f"v{version}")
    raised = [e for e in events if e.get("event") == "alarm" and e.get("alarm") == "drift"]
    if raised:
        drift_ax.scatter([e["since_t"] for e in raised], [1.0] * len(raised), marker="v", color="red", s=18,
                         zorder=5, label=f"drift alarm raised ({len(raised)})")
    drift_ax.axhline(1.0, color="red", lw=0.8, alpha=0.6)
    drift_ax.set_yscale("log")
    drift_ax.set_ylabel("statistic / alarm threshold")
    drift_ax.set_title("Drift: the largest statistic over 32 streams (30 features, score, pca) against its threshold")
    count_ax.set_ylabel("streams alarming")

    twin = label_ax.twinx()
    quality_versions = _versions(all_snaps, "quality")
    for i, version in enumerate(quality_versions):
        color = f"C{i}"
        q = lambda s, v=version: ((s.get("quality") or {}).get("versions") or {}).get(v) or {}  # noqa: E731
        timeline = _live(all_snaps, lambda s: q(s).get("labelled"))
        xs, ys = _series(timeline, lambda s: q(s).get("error_rate"))
        label_ax.plot(xs, ys, "-", color=color, label=f"v{version}: error rate, rows window")
        xs, ys = _series(timeline, lambda s: q(s).get("recent_error_rate"))
        label_ax.plot(xs, ys, ":", color=color, label=f"v{version}: error rate, latest 1,000 labels")
        xs, ys = _series(timeline, lambda s: q(s).get("cusum_ratio"))
        twin.plot(xs, ys, "--", color=color, alpha=0.6, label=f"v{version}: label CUSUM / h")
        xs, ys = _series(timeline, lambda s: q(s).get("auc"))
        auc_ax.plot(xs, ys, "-", color=color, label=f"v{version}: online ROC AUC, rows window")
    label_alarms = [e for e in events if e.get("event") == "alarm" and e.get("alarm") == "quality"]
    if label_alarms:
        twin.scatter([e["since_t"] for e in label_alarms], [1.0] * len(label_alarms), marker="v", color="red", s=30,
                     zorder=5, label="label alarm raised (error rate or ranking)")
    twin.axhline(1.0, color="red", lw=0.8, alpha=0.4)
    twin.set_ylabel("CUSUM / h")
    label_ax.set_ylabel("label error rate")
    label_ax.set_title(f"Labels (fed back {report['plan']['label_delay_s']:g} s after each request)")
    for c in report.get("auc_checkpoints") or []:
        for version, doc in (c.get("versions") or {}).items():
            if doc.get("offline") is not None:
                auc_ax.scatter([c["t"]], [doc["offline"]], marker="x", s=40, zorder=5,
                               color=f"C{quality_versions.index(version) if version in quality_versions else 0}")
    auc_ax.scatter([], [], marker="x", color="0.3", label="offline (sklearn on the log, same rows)")
    auc_ax.set_ylabel("ROC AUC")

    timeline = all_snaps
    history = report.get("rollout_history") or []
    ro = report.get("rollout") or {}
    answers = report.get("answers_by_version") or {}
    if answers.get("t"):
        totals = [sum(answers[v][i] for v in answers if v not in ("t", "bin_s")) for i in range(len(answers["t"]))]
        for v in sorted((v for v in answers if v not in ("t", "bin_s", "1")), key=int):
            xs = [t + answers["bin_s"] / 2 for t, n in zip(answers["t"], totals) if n]
            ys = [100.0 * a / n for a, n in zip(answers[v], totals) if n]
            version_ax.plot(xs, ys, ".", ms=3, color=f"C{int(v) - 1}", label=f"v{v}: share of requests answered, %")
    if ro.get("stages"):
        xs = [st["t"] for st in ro["stages"]]
        ys = [100.0 * (st["weight"] or 0.0) for st in ro["stages"]]
        end = ro.get("decision_t") if ro.get("decision") not in (None, "promote") else None
        last_t = max([s["t"] for s in timeline] or [xs[-1]])
        xs, ys = xs + ([end, end] if end is not None else [last_t]), ys + ([ys[-1], 0.0] if end is not None
                                                                            else [ys[-1]])
        version_ax.step(xs, [max(y, 0.1) for y in ys], where="post", color="k", lw=1.2,
                        label=f"v{ro['version']}: candidate weight (controller), %")
        for st in ro["stages"]:
            version_ax.annotate(f"{100 * (st['weight'] or 0):g} %", (st["t"], max(100 * (st["weight"] or 0), 0.1)),
                                xytext=(2, 3), textcoords="offset points", fontsize=7)
    version_ax.set_yscale("log")
    version_ax.set_ylim(0.1, 200)
    version_ax.set_ylabel("% of requests")
    version_ax.set_title("Rollout of the retrained version: stages as set, requests as answered"
                         + (f" ({ro['decision']} at {ro['decision_t']:.0f} s)" if ro.get("decision") else ""))
    rate_ax = version_ax.twinx()
    logged = [(s["t"], s["metrics"].get("log_rows")) for s in timeline if (s.get("metrics") or {}).get("log_rows")]
    if len(logged) > 1:
        rate_ax.plot([b[0] for b in logged[1:]],
                     [(b[1] - a[1]) / max(b[0] - a[0], 1e-9) for a, b in zip(logged, logged[1:])],
                     color="C7", lw=0.8, alpha=0.7, label="log rows written / s")
        rate_ax.set_ylabel("log rows / s")
    version_ax.set_xlabel("seconds since the load started")

    retrain = report.get("retrain") or {}
    marks = [(o["t"], f"onset: {o['name']}", "k", "-") for o in report.get("onsets", [])]
    if retrain.get("submitted"):
        marks.append((retrain["submitted_t"], "retrain submitted", "C3", ":"))
        if retrain.get("ended_t") is not None:
            marks.append((retrain["ended_t"], f"retrain {str(retrain.get('status')).lower()}", "C3", "-."))
        if retrain.get("published_t") is not None:
            marks.append((retrain["published_t"], f"v{retrain.get('new_version')} published, gate "
                          f"{retrain.get('gate')}", "C2", ":"))
        elif retrain.get("served_t") is not None:
            marks.append((retrain["served_t"], f"v{retrain.get('new_version')} answering", "C2", "-."))
    ro = report.get("rollout") or {}
    for st in ro.get("stages") or []:
        is_last = st is ro["stages"][-1] and ro.get("decision") == "promote"
        text = (f"v{ro['version']} promoted" if is_last else
                f"canary {100 * (st['weight'] or 0):g} %" if st["stage"] == 0 else "")
        marks.append((st["t"], text, "C2", "-" if is_last or st["stage"] == 0 else "--"))
    if ro.get("decision") not in (None, "promote"):
        marks.append((ro["decision_t"], f"v{ro['version']} {ro['decision']}", "red", "-"))
    for ax in axes:
        for t, text, color, style in marks:
            ax.axvline(t, color=color, linestyle=style, lw=1.0, alpha=0.7)
        ax.grid(True, alpha=0.3)
    for t, text, color, _ in [m for m in marks if m[1]]:
        drift_ax.annotate(text, (t, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                          textcoords="offset points", fontsize=8, color=color, rotation=90, va="top")
    for ax, other in ((drift_ax, None), (count_ax, None), (auc_ax, None), (label_ax, twin), (version_ax, rate_ax)):
        handles, labels = ax.get_legend_handles_labels()
        if other is not None:
            more = other.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=_LEGEND_AT[other is not None],
                      frameon=False)
    p = report["plan"]
    fig.suptitle(f"fleet lifecycle: {p['rate_rps'] * p['rows_per_request']:,.0f} rows/s of fraud traffic, "
                 f"git {str(report.get('git_sha'))[:12]}", fontsize=11)
    return _save(fig, path)
