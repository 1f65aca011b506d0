"""The lifecycle scenario's figures from what was recorded: detector delays, false alarms, AUCs, goals, markdown.

Pure functions over plain data (no cluster, no clock), so `tests/unit/test_lifecycle_bench.py`
checks the arithmetic:

- `rows_at`: how many rows the replay had sent by a moment (from the requests' send times);
- `detector_delays`: per onset, the first alarm of each (kind, version, stream) raised after it
  and before the next onset, as a delay in rows and seconds, and the streams already alarming;
- `stable_false_alarms`: alarms raised before the first onset;
- `window_auc`: the offline ROC AUC of the rows the monitor's rows window holds (the latest
  `window` labelled predictions of a version, in the order the monitor joined them);
- `rollout_of`: the retrained version's rollout from the controller's history and decisions
  (start, each stage with its weight, promote or rollback, the judge's evidence per gate);
- `stable_at`: the stable version at a moment, from the rollout history;
- `closed_loop`: onset, alarm, job, gate, candidate, stages, decision in one ordered list;
- `lifecycle_goals` and `lifecycle_markdown`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rows_at", "detector_delays", "stable_false_alarms", "window_auc", "auc_checks", "lifecycle_goals",
           "lifecycle_markdown", "serving_at", "AUC_TOLERANCE", "rollout_of", "stable_at", "closed_loop",
           "PROMOTION_GOAL_S"]

AUC_TOLERANCE = 0.001
PROMOTION_GOAL_S = 300.0  # a good version goes from its first stage to 100 % within 5 minutes at 200 req/s
_DECISIONS = ("promote", "rollback", "abort", "supersede")


def rows_at(send_s: np.ndarray, rows_per_request: int, t_s: float) -> int:
    """Rows in the requests scheduled before `t_s` (`send_s`: each request's intended send time, sorted)."""
    return int(np.searchsorted(np.asarray(send_s, np.float64), t_s, side="left")) * int(rows_per_request)


def _alarms(events: list[dict]) -> list[dict]:
    return sorted((e for e in events if e.get("event") == "alarm"), key=lambda e: e["since_t"])


def stable_false_alarms(events: list[dict], first_onset_t: float) -> list[dict]:
    """Alarms (drift or quality) raised before the first onset: on stable traffic, each is a false alarm."""
    return [e for e in _alarms(events) if e["since_t"] < first_onset_t]


def _active_at(events: list[dict], t: float) -> list[str]:
    """Alarms holding at `t`, as "kind v<version> stream" (raised before it, not cleared by then)."""
    state: dict[tuple, bool] = {}
    for e in sorted((e for e in events if e.get("event") in ("alarm", "alarm_cleared")), key=lambda e: e["since_t"]):
        if e["since_t"] >= t:
            break
        state[(e["alarm"], e["version"], e["stream"])] = e["event"] == "alarm"
    return sorted(f"{a} v{v} {s}" for (a, v, s), on in state.items() if on)


def detector_delays(events: list[dict], onsets: list[dict], send_s: np.ndarray, rows_per_request: int) -> list[dict]:
    """Per onset ({"name", "t", "row"}), the alarms raised between it and the next onset.

    Each alarm event holds `since_t` (the monitor's time of the alarm, seconds from the load's
    start), `alarm` ("drift" | "quality"), `version`, `stream`, `detector`. The delay in rows is
    the rows the replay had sent by the alarm less the onset's row: it includes the pipeline's
    lag (a replica's push, about 1 s; the monitor's tick, 1 s; for labels, their delay too).
    `already_alarming` / `alarming_at_end`: the alarms holding at the onset and at the next one (or at the end).
    """
    out = []
    ends = [o["t"] for o in onsets[1:]] + [math.inf]
    for onset, end in zip(onsets, ends):
        first: dict[tuple, dict] = {}
        for e in _alarms(events):
            if onset["t"] <= e["since_t"] < end:
                key = (e["alarm"], e["version"], e["stream"])
                if key not in first:
                    first[key] = {"alarm": e["alarm"], "version": e["version"], "stream": e["stream"],
                                  "detector": e.get("detector"), "statistic": e.get("statistic"),
                                  "delay_s": round(e["since_t"] - onset["t"], 2),
                                  "delay_rows": rows_at(send_s, rows_per_request, e["since_t"]) - onset["row"],
                                  "detector_rows": e.get("rows")}
        alarms = sorted(first.values(), key=lambda a: a["delay_rows"])
        summary: dict = {}
        for label, pick in (("first_drift", lambda a: a["alarm"] == "drift"),
                            ("first_feature", lambda a: a["alarm"] == "drift" and a["stream"] not in ("score", "pca")),
                            ("score", lambda a: a["alarm"] == "drift" and a["stream"] == "score"),
                            ("pca", lambda a: a["alarm"] == "drift" and a["stream"] == "pca"),
                            ("label_error", lambda a: a["alarm"] == "quality"),
                            ("cusum", lambda a: a["detector"] == "cusum"),
                            ("rows_window", lambda a: a["detector"] == "rows_window"),
                            ("time_window", lambda a: a["detector"] == "time_window")):
            hit = next((a for a in alarms if pick(a)), None)
            summary[label] = None if hit is None else {k: hit[k] for k in ("version", "stream", "detector",
                                                                             "delay_rows", "delay_s")}
        out.append({"onset": onset["name"], "t": onset["t"], "row": onset["row"],
                    "already_alarming": _active_at(events, onset["t"]),
                    "alarming_at_end": _active_at(events, end),
                    "drift_streams_alarmed": len({a["stream"] for a in alarms if a["alarm"] == "drift"}),
                    "summary": summary, "alarms": alarms})
    return out


def window_auc(received_us: np.ndarray, predicted_us: np.ndarray, labels: np.ndarray, scores: np.ndarray,
               window: int) -> dict:
    """ROC AUC of the latest `window` labelled predictions, in the monitor's order.

    The monitor adds labelled predictions as its scans join them: label files in the order they
    were written (`received_at`), each scan's rows by prediction time. Ordering by (received_at,
    prediction time) gives the same rows whenever one scan read one feedback body, as here (one
    body a second, one scan a second, and every prediction logged before its label came).
    """
    from sklearn.metrics import roc_auc_score

    order = np.lexsort((np.asarray(predicted_us), np.asarray(received_us)))
    take = order[-window:] if window > 0 else order
    y, s = np.asarray(labels)[take], np.asarray(scores, np.float64)[take]
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None
    return {"rows": int(len(take)), "roc_auc": auc, "positives": int(y.sum())}


def auc_checks(checkpoints: list[dict]) -> dict:
    """The largest |online - offline| over every checkpoint and version, and whether all are within tolerance."""
    diffs = [v["diff"] for c in checkpoints for v in c.get("versions", {}).values() if v.get("diff") is not None]
    same_rows = all(v.get("rows_online") == v.get("rows_offline") for c in checkpoints
                    for v in c.get("versions", {}).values())
    worst = max(diffs) if diffs else None
    return {"comparisons": len(diffs), "max_abs_diff": worst, "same_row_counts": same_rows,
            "met": None if worst is None else worst <= AUC_TOLERANCE}


def serving_at(first_answered: dict, t: float) -> int | None:
    """The version answering at `t`: the newest one first answered by then (`first_answered`: {version: t})."""
    seen = [int(v) for v, first in first_answered.items() if first <= t]
    return max(seen) if seen else None


def stable_at(history: list[dict], t: float) -> int | None:
    """The stable version at `t` (s from the start) from a rollout history ({"t", "event", "version"}, in order):
    the version of the last "stable" or "promote" event by then."""
    stable = None
    for h in history:
        if h["t"] > t:
            break
        if h.get("event") in ("stable", "promote") and h.get("version") is not None:
            stable = int(h["version"])
    return stable


def rollout_of(history: list[dict], decisions: list[dict], version: int) -> dict | None:
    """The rollout of `version`: {"start_t", "stages": [{"stage", "weight", "t"}], "decision", "decision_t",
    "reason", "gates", "arms", "start_to_decision_s"}, or None when it never started.

    `history`: the rollout.json history ({"t", "event", ...}; a stage event names no version, it belongs to
    the start before it); `decisions`: the controller's audit records (rollout.jsonl) with per-gate evidence.
    The first stage is the start's weight; each "stage" event is a stage the judge passed into, and a
    "promote" is the move to 100 %.
    """
    start = next((i for i, h in enumerate(history) if h.get("event") == "start" and h.get("version") == version), None)
    if start is None:
        return None
    first = history[start]
    record = next((r for r in decisions if r.get("event") == "start" and r.get("version") == version), {})
    out = {"version": version, "mode": first.get("mode"), "by": first.get("by"), "start_t": first["t"],
           "stages": [{"stage": 0, "weight": record.get("weight"), "t": first["t"]}], "decision": None,
           "decision_t": None, "reason": None, "gates": None, "arms": None, "start_to_decision_s": None}
    for h in history[start + 1:]:
        event = h.get("event")
        if event == "start":
            break
        if event == "stage":
            out["stages"].append({"stage": h.get("stage"), "weight": h.get("weight"), "t": h["t"]})
        elif event in _DECISIONS:
            out.update(decision=event, decision_t=h["t"], reason=h.get("reason"),
                       start_to_decision_s=round(h["t"] - first["t"], 1))
            if event == "promote":
                out["stages"].append({"stage": len(out["stages"]), "weight": 1.0, "t": h["t"]})
            break
    # Each stage's evidence when it passed: the audit records of the stage moves and of the decision.
    # (A decision's record names the version; a stage move's names it as the candidate.)
    passed = [r for r in decisions if r.get("event") in ("stage", *_DECISIONS)
              and (r.get("version") if r.get("event") in _DECISIONS else r.get("candidate")) == version]
    for stage, r in zip(out["stages"][1:], passed):
        stage["passed_gates"] = r.get("gates")  # the previous stage's evidence when it passed
    final = next((r for r in passed if r.get("event") in _DECISIONS), None)
    if final is not None:
        out.update(gates=final.get("gates"), arms=final.get("arms"),
                   judge_reason=final.get("decision_reason") or final.get("reason"))
    return out


def closed_loop(report: dict) -> list[dict]:
    """The loop's steps in time order, {"t", "step", "detail"}: onsets, the first alarms after them, the retrain
    job, its gate, the candidate, each canary stage, the decision, and the checkpoints' ROC AUC."""
    steps = []
    for o in report.get("onsets") or []:
        steps.append({"t": o["t"], "step": f"onset: {o['name']}", "detail": f"row {o['row']:,}"})
    for d in report.get("delays") or []:
        hit = d["summary"].get("first_drift")
        if hit is not None:
            steps.append({"t": d["t"] + hit["delay_s"], "step": f"first drift alarm after {d['onset']}",
                          "detail": f"{hit['stream']} ({hit['detector']}, v{hit['version']}), "
                                    f"{hit['delay_rows']:,} rows after the onset"})
    r = report.get("retrain") or {}
    if r.get("submitted"):
        steps.append({"t": r["submitted_t"], "step": "retrain job submitted",
                      "detail": f"alarms held {r.get('held_s')} s on v{r.get('version')}: {r.get('job')}"})
        if r.get("ended_t") is not None:
            steps.append({"t": r["ended_t"], "step": f"retrain job {str(r.get('status')).lower()}",
                          "detail": f"after {r['duration_s']:.0f} s" if r.get("duration_s") is not None else ""})
        if r.get("published_t") is not None:
            steps.append({"t": r["published_t"], "step": f"offline gate: v{r.get('new_version')} {r.get('gate')}",
                          "detail": r.get("gate_reason") or ""})
    ro = report.get("rollout") or {}
    for stage in ro.get("stages") or []:
        weight = stage.get("weight")
        pct = "-" if weight is None else f"{weight * 100:g} %"
        if stage["stage"] == 0:
            name, detail = f"canary start: v{ro['version']} at {pct}", f"by {ro.get('by')}"
        elif weight == 1.0 and ro.get("decision") == "promote" and stage is ro["stages"][-1]:
            name, detail = f"promote: v{ro['version']} at 100 %, stable", ro.get("judge_reason") or ""
        else:
            name, detail = f"stage {stage['stage']}: {pct}", ""
        gates = stage.get("passed_gates")
        if gates and stage["stage"] > 0:
            detail = (detail + "; " if detail else "") + "the previous stage passed on " + ", ".join(
                f"{g} n={v.get('n')}" for g, v in gates.items())
        steps.append({"t": stage["t"], "step": name, "detail": detail})
    if ro.get("decision") not in (None, "promote"):
        steps.append({"t": ro["decision_t"], "step": f"{ro['decision']}: v{ro['version']}",
                      "detail": ro.get("judge_reason") or ro.get("reason") or ""})
    for c in report.get("auc_checkpoints") or []:
        parts = [f"v{v}: AUC {_fmt(d.get('online'))}, accuracy {_fmt(d.get('accuracy'))}"
                 for v, d in sorted(c.get("versions", {}).items())]
        steps.append({"t": c["t"], "step": f"checkpoint: {c['name']}", "detail": "; ".join(parts)})
    return sorted(steps, key=lambda s: s["t"])


def _goal(name: str, value, target, met, unit: str = "") -> dict:
    gap = None
    if met is False and isinstance(value, (int, float)) and isinstance(target, (int, float)):
        gap = round(value - target, 4)
    return {"goal": name, "value": value, "target": target, "unit": unit, "met": met, "gap": gap}


def lifecycle_goals(report: dict) -> list[dict]:
    """The lifecycle scenario's promises, as goals of the benchmark report (the shape of `ratios_and_goals`)."""
    goals = []
    false = report.get("stable_false_alarms") or []
    goals.append(_goal(f"lifecycle: alarms during the stable phase ({report.get('stable_rows', 0):,} rows)",
                       len(false), 0, len(false) == 0))
    delays = {d["onset"]: d for d in report.get("delays") or []}
    cov = delays.get("covariate_shift")
    if cov is not None:
        first = cov["summary"]["first_drift"]
        goals.append(_goal("lifecycle: covariate shift raises a drift alarm (rows after the onset)",
                           None if first is None else first["delay_rows"], None, first is not None, "rows"))
    concept = delays.get("concept_shift")
    if concept is not None:
        hit = concept["summary"]["label_error"]
        # Raised on the serving version before the onset and held to the end: nothing new to raise. (An alarm
        # of a version no longer answering holds for ever: no labels come to clear it.)
        first_answered = report.get("versions_first_answered_t") or {"1": 0.0}
        history = report.get("rollout_history")
        if history:  # a canary answers a share of requests before it is stable: the stable version serves
            serving, last = stable_at(history, concept["t"]), stable_at(history, math.inf)
        else:
            serving, last = serving_at(first_answered, concept["t"]), serving_at(first_answered, math.inf)
        mine = f"quality v{serving} label_error"
        held = mine in concept["already_alarming"] and mine in concept.get("alarming_at_end", []) \
            and last == serving
        if hit is None and held:
            goals.append(_goal("lifecycle: concept shift raises the label-error alarm (rows after the onset)",
                               "held from before the onset", None, None, ""))
        else:
            goals.append(_goal("lifecycle: concept shift raises the label-error alarm (rows after the onset)",
                               None if hit is None else hit["delay_rows"], None, hit is not None, "rows"))
    auc = report.get("auc") or {}
    goals.append(_goal("lifecycle: online ROC AUC (rows window) vs sklearn on the same rows, max |diff|",
                       auc.get("max_abs_diff"), AUC_TOLERANCE, auc.get("met")))
    retrain = report.get("retrain") or {}
    goals.append(_goal("lifecycle: the monitor submitted a retrain", retrain.get("submitted", False), True,
                       bool(retrain.get("submitted"))))
    if retrain.get("submitted"):
        goals.append(_goal("lifecycle: the retrain job's outcome", retrain.get("status"), "SUCCEEDED",
                           retrain.get("status") == "SUCCEEDED"))
        if retrain.get("gate") == "rejected":
            goals.append(_goal("lifecycle: the retrained version served", "rejected by the gate", None, None))
        else:
            served = retrain.get("served_t") is not None
            goals.append(_goal("lifecycle: the retrained version served", served, True, served))
    if retrain.get("gate") == "accepted" and "rollout" in report:
        ro = report.get("rollout") or {}
        decision = ro.get("decision")
        goals.append(_goal("lifecycle: the retrained version's canary ends without human action",
                           decision or "undecided at the end", "promote", decision == "promote"))
        took = ro.get("start_to_decision_s") if decision == "promote" else None
        goals.append(_goal(f"lifecycle: canary 1 % -> 100 % at {report['plan']['rate_rps']:g} req/s (s)",
                           took, PROMOTION_GOAL_S, None if decision != "promote" else took <= PROMOTION_GOAL_S, "s"))
    if "statuses" in report:
        bad = sum(n for s, n in report["statuses"].items() if s != "200")
        goals.append(_goal("lifecycle: requests not answered 200 (client-visible errors)", bad, 0, bad == 0))
    return goals


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _phase(phase: dict) -> str:
    if phase.get("until_decided"):
        return f"{phase['scenario']} {phase['seconds']:g} s to {phase['max_seconds']:g} s (until the rollout is decided)"
    return f"{phase['scenario']} {phase['seconds']:g} s"


def _grouped(alarms: list[str]) -> str:
    """"drift v1 amount", ... as "drift v1: 16 streams", naming the streams when there are at most 3."""
    groups: dict[str, list[str]] = {}
    for a in alarms:
        kind, version, stream = a.split(" ", 2)
        groups.setdefault(f"{kind} {version}", []).append(stream)
    return "; ".join(f"{g}: {len(s)} streams" if len(s) > 3 else f"{g}: {', '.join(s)}"
                     for g, s in groups.items()) or "-"


def lifecycle_markdown(report: dict) -> str:
    """The scenario's figures as markdown (what summary.md and benchmarks/README.md quote)."""
    p = report["plan"]
    lines = [f"# fleet lifecycle scenario, git {report.get('git_sha')}, {report.get('created_at')}", "",
             f"{p['rate_rps']:g} requests/s of {p['rows_per_request']} rows "
             f"({p['rate_rps'] * p['rows_per_request']:,.0f}"
             f" rows/s), phases " + ", ".join(_phase(ph) for ph in p["phases"])
             + (f" (ended at {', '.join(f'{t:.0f}' for t in report['phase_ends_t'])} s)"
                if report.get("phase_ends_t") else "")
             + f"; labels fed back {p['label_delay_s']:g} s after each request; retrain_after_s "
             f"{p['retrain_after_s']:g}; {report.get('rows_sent', 0):,} rows sent, "
             f"{report.get('rows_answered', 0):,} answered 200.", ""]
    lines += ["## Detector delays (rows after each onset; the pipeline's lag included)", "",
              "| onset | at row | first drift alarm | first feature | score | pca | label error | streams alarmed | "
              "already alarming |", "|---|---:|---|---|---|---|---|---:|---|"]

    def cell(hit) -> str:
        if hit is None:
            return "-"
        return (f"{hit['delay_rows']:,} rows / {hit['delay_s']:.0f} s "
                f"({hit['stream']}, {hit['detector']}, v{hit['version']})")

    for d in report.get("delays") or []:
        s = d["summary"]
        lines.append(f"| {d['onset']} | {d['row']:,} | {cell(s['first_drift'])} | {cell(s['first_feature'])} | "
                     f"{cell(s['score'])} | {cell(s['pca'])} | {cell(s['label_error'])} | "
                     f"{d['drift_streams_alarmed']} | "
                     f"{_grouped(d['already_alarming'])} |")
    false = report.get("stable_false_alarms") or []
    lines += ["", f"False alarms during the stable phase ({report.get('stable_rows', 0):,} rows): {len(false)}"
              + ("" if not false else ": " + ", ".join(f"{e['alarm']} {e['stream']} at {e['since_t']:.0f} s"
                                                      for e in false)), ""]
    lines += ["## Online vs offline ROC AUC (the rows window, sklearn on the same rows read from the log)", "",
              "| checkpoint | version | rows | online | offline | abs diff | accuracy (online) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report.get("auc_checkpoints") or []:
        for v, doc in sorted(c.get("versions", {}).items()):
            lines.append(f"| {c['name']} ({c['t']:.0f} s) | {v} | {_fmt(doc.get('rows_online'))} | "
                         f"{_fmt(doc.get('online'))} | {_fmt(doc.get('offline'))} | {_fmt(doc.get('diff'))} | "
                         f"{_fmt(doc.get('accuracy'))} |")
    r = report.get("retrain") or {}
    lines += ["", "## Retrain", ""]
    if r.get("submitted"):
        lines.append(f"- submitted at {r['submitted_t']:.0f} s (alarms held {r.get('held_s')} s on version "
                     f"{r.get('version')}): job {r.get('job')}, `{r.get('entrypoint')}`")
        lines.append(f"- outcome: {r.get('status') or 'still running at the end'}"
                     + (f" after {r['duration_s']:.0f} s" if r.get("duration_s") is not None else ""))
        if r.get("new_version") is not None:
            lines.append(f"- published version {r['new_version']}, gate {r.get('gate')} "
                         f"({r.get('gate_reason') or ''}); first answered by it at "
                         + (f"{r['served_t']:.0f} s" if r.get("served_t") is not None else "never (not served)"))
    else:
        lines.append("- no retrain was submitted")
    ro = report.get("rollout")
    if ro:
        lines += ["", f"## The retrained version's rollout ({ro.get('mode')}; stages "
                  f"{report.get('rollout_config', {}).get('stages')} %)", ""]
        lines.append(f"- decision: {ro.get('decision') or 'none by the end'}"
                     + (f" at {ro['decision_t']:.0f} s, {ro['start_to_decision_s']:.0f} s after the start"
                        if ro.get("decision_t") is not None else "")
                     + (f": {ro.get('judge_reason') or ro.get('reason')}" if ro.get("decision") else ""))
        if ro.get("gates"):
            lines.append("- evidence per gate at the decision: " + "; ".join(
                f"{g} {v.get('state')} (log e {_fmt(v.get('statistic'))} vs {_fmt(v.get('threshold'))}, "
                f"n {_fmt(v.get('n'))}, ratio {_fmt(v.get('estimate'))})" for g, v in ro["gates"].items()))
    loop = report.get("closed_loop") or []
    if loop:
        lines += ["", "## The closed loop, in time order (s from the load's start)", "", "| t (s) | step | detail |",
                  "|---:|---|---|"]
        lines += [f"| {s['t']:.0f} | {s['step']} | {s['detail']} |" for s in loop]
    lines += ["", *_goals_table(report.get("goals") or [])]
    return "\n".join(lines) + "\n"


def _goals_table(goals: list[dict]) -> list[str]:
    """Goals (`_goal`'s shape) as the lines of a markdown table: value, target, met (with the gap if not)."""
    lines = ["| goal | value | target | met |", "|---|---:|---:|---|"]
    for g in goals:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "no" + (f" (gap {g['gap']})" if g["gap"] else ""))
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} {g['unit']} | {_fmt(g['target'])} {g['unit']} | {met} |")
    return lines
