"""Drift and label-error detection, calibrated and timed in-process: seeded trials of `serving.monitoring.drift`.

    python -m benchmarks.drift_trials [--quick] [--out DIR] [--seed N] [--labels-only]

No cluster: the detector code runs on replayed traffic of the fraud version `make serve`
publishes (`benchmarks.drift_world`), binned as the server bins it. Sections (each timed; a
section that fails is recorded as an error, the others still run):
- stable replay: 10 M stable rows (1 M with --quick) through all 32 streams: alarms (goal 0);
- 0.1 sd mean shift of V3 at a random row, 300 onsets: delay in rows (goal: all within 20,000,
  median <= 10,000); the same for other continuous features (100 onsets each), and 0.3 sd;
- a design-shift sweep (d* of the ridit CUSUM) on the 0.1 sd V3 onsets;
- correlation-only shift (scenario "correlation_shift"), 100 onsets: the PCA stream's delay
  (goal: within 50,000 rows) and the alarms of every other stream (goal 0);
- calibration by multinomial simulation: false alarms per 864 M rows (fresh reference per
  version) and at looser targets, the chi^2 thresholds' exceedance at alpha 1e-3..1e-5, the
  CUSUMs' crossings per row against e^-h;
- label errors 5 % -> 10 %: fleet's Bernoulli CUSUM vs river's ADWIN, DDM, PageHinkley (delays
  over 300 onsets; false alarms over 1.5 M stable labels per trial);
- anchors: a fixed PSI >= 0.1 rule (Evidently's default) and river's PageHinkley on stable rows;
- cost: microseconds per `VersionDrift.add` of 32 streams.

Writes report.json (git SHA, machine, parameters, every figure), summary.md and delays.png into
--out (default benchmarks/results/drift/). The full run takes 25-40 minutes on 2 cores, most of it the
calibration's 10 billion simulated rows; --quick about one minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.drift_calibration import chi2_exceedance, cusum_exceedance, version_runs
from benchmarks.drift_labels import label_onsets, label_stable, river_onsets, river_stable
from benchmarks.drift_report import markdown, plot_delays
from benchmarks.drift_rows import (correlation_rows, delay_summary, fixed_psi_anchor, onset_trials,
                                   page_hinkley_anchor, shifted_rows, stable_replay, step_cost)
from benchmarks.drift_world import STEP_ROWS, FraudWorld, StablePool
from benchmarks.report import git_sha, machine
from serving.monitoring.detectors import LabelConfig
from serving.monitoring.drift import DriftConfig

__all__ = ["main", "run", "PLANS"]

RESULTS = Path("benchmarks/results/drift")
OTHER_FEATURES = ("amount", "hour", "merchant_risk", "distance_km", "account_age_days", "V1", "V8", "V15", "V22")

PLANS = {
    "full": {"pool_rows": 10_000_000, "v3_trials": 300, "other_trials": 100, "other_features": OTHER_FEATURES,
             "big_shift_trials": 100, "sweep_trials": 100, "sweep": (0.05, 0.1, 0.2), "corr_trials": 100,
             "label_trials": 300, "label_stable_trials": 400, "river_stable_trials": 4,
             "calibration_target_runs": 12,
             # (F, runs, rows per run, rows per step): 5,000 rows/s, and 20 rows/s (time windows of 6,000 rows)
             "calibration_loose": ((1e6, 10, 20_000_000, 5_000), (1e7, 10, 100_000_000, 5_000),
                                   (1e5, 2, 5_000_000, 20)),
             "label_sweep": True,
             "calibration_step_rows": 5_000, "chi2_draws": 2_000_000, "cusum_rows": 10_000_000, "cusum_copies": 25,
             "anchor_windows": 100},
    "quick": {"pool_rows": 1_000_000, "v3_trials": 40, "other_trials": 10, "other_features": ("amount", "V1"),
              "big_shift_trials": 20, "sweep_trials": 0, "sweep": (), "corr_trials": 15,
              "label_trials": 60, "label_stable_trials": 10, "river_stable_trials": 1,
              "calibration_target_runs": 1, "calibration_loose": ((1e6, 2, 10_000_000, 5_000),),
              "label_sweep": False,
              "calibration_step_rows": 5_000, "chi2_draws": 100_000, "cusum_rows": 1_000_000, "cusum_copies": 10,
              "anchor_windows": 20},
}
_CALIBRATION_TARGET_ROWS = 864e6
_CHI2_STREAMS = ("V3", "amount", "txn_count_1h", "is_foreign", "score", "pca")
_CHI2_WINDOWS = (1_000, 10_000, 150_000)
_CUSUM_STREAMS = ("V3", "amount", "txn_count_1h", "is_foreign", "pca")


def run(quick: bool, out: Path, seed: int = 0, labels_only: bool = False) -> dict:
    plan = PLANS["quick" if quick else "full"]
    started = datetime.datetime.now(datetime.timezone.utc)
    report: dict = {"benchmark": "drift_trials", "started": started.isoformat(), "git_sha": git_sha(),
                    "machine": machine(), "quick": quick, "seed": seed, "plan": _jsonable(plan),
                    "drift_config": dataclasses.asdict(DriftConfig()),
                    "label_config": dataclasses.asdict(LabelConfig()),
                    "step_rows": STEP_ROWS, "sections": {}, "errors": [], "seconds": {}}
    import native

    report["native_backend"] = native.BACKEND
    state: dict = {}

    def section(name: str, fn) -> None:
        print(f"[drift] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][name] = fn()
        except Exception as exc:  # recorded as data: the other sections still run
            report["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(f"[drift] {name} failed: {exc}", flush=True)
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"[drift] {name}: {report['seconds'][name]} s", flush=True)

    def world():
        state["world"] = FraudWorld(seed=0)
        state["pool"] = StablePool.build(state["world"], plan["pool_rows"], seed=1_000 + seed)
        w, pool = state["world"], state["pool"]
        return {"train_rows": w.train_rows, "holdout_rows": w.holdout_rows, "streams": w.streams, "bins": w.bins,
                "reference_rows": {r.name: int(r.counts.sum()) for r in w.references},
                "pca_components": len(w.monitoring["pca"]["components"]),
                "score_model": "FraudMLP, fit_fraud with 3 epochs on the 32,000 training rows (make serve: 10)",
                "holdout_label_error": w.monitoring["label_error"], "pool_rows": pool.rows,
                "pool_seconds": round(pool.seconds, 1)}

    if labels_only:  # the label streams need no world: a rerun of that section alone takes under a minute
        section("labels", lambda: _labels(plan, seed))
        return _finish(report, out)
    section("world", world)
    if "world" not in state:
        return _finish(report, out)
    w, pool = state["world"], state["pool"]
    section("stable_replay", lambda: stable_replay(w, pool))

    def onsets(feature: str, shift: float, trials: int, salt: int, config=DriftConfig(), goal=20_000):
        r = onset_trials(w, pool, shifted_rows(w, feature, shift), watch=[feature], trials=trials,
                         seed=seed * 1_000 + salt, config=config)
        return {**r, "feature": feature, "shift_sd": shift, "summary": delay_summary(r["delays"], goal)}

    section("shift_0.1sd_V3", lambda: onsets("V3", 0.1, plan["v3_trials"], 1))
    section("shift_0.1sd_other", lambda: {f: onsets(f, 0.1, plan["other_trials"], 10 + i)
                                          for i, f in enumerate(plan["other_features"])})
    section("shift_0.3sd_V3", lambda: onsets("V3", 0.3, plan["big_shift_trials"], 2))
    if plan["sweep"]:
        def sweep():
            out = {}
            for d in plan["sweep"]:
                r = onsets("V3", 0.1, plan["sweep_trials"], 3, DriftConfig(design_shift_sd=d))
                out[f"{d:g}"] = {**r["summary"], "first_detector": r["first_detector"]}
            return out

        section("design_shift_sweep", sweep)

    def correlation():
        r = onset_trials(w, pool, correlation_rows, watch=["pca"], trials=plan["corr_trials"], seed=seed * 1_000 + 4,
                         horizon_rows=60_000, run_to_horizon=True)
        features = [n for n in w.names if n not in ("pca", "score")]
        return {**r, "summary": delay_summary(r["delays"], 50_000),
                "feature_stream_alarms": sum(r["alarms_after_onset"].get(f, 0) for f in features)}

    section("correlation_shift", correlation)
    section("fixed_psi_anchor", lambda: fixed_psi_anchor(w, pool, shifted_windows=plan["anchor_windows"]))
    section("page_hinkley_anchor", lambda: page_hinkley_anchor(pool))
    section("cost", lambda: step_cost(w, pool, steps=min(3_000, len(pool.counts) - 700)))

    truth = w.true_probabilities(pool.counts)
    m = np.array([int(r.counts.sum()) for r in w.references])

    def calibration():
        out = {"target": version_runs(truth, m, w.names, false_alarm_rows=_CALIBRATION_TARGET_ROWS,
                                      rows_per_run=int(_CALIBRATION_TARGET_ROWS if not quick else 86_400_000),
                                      runs=plan["calibration_target_runs"], step_rows=plan["calibration_step_rows"],
                                      seed=seed * 1_000 + 5)}
        out["looser"] = [version_runs(truth, m, w.names, false_alarm_rows=f, rows_per_run=rows, runs=runs,
                                      step_rows=step, seed=seed * 1_000 + 6)
                         for f, runs, rows, step in plan["calibration_loose"]]
        return out

    section("calibration", calibration)

    def chi2():
        out = {}
        for k, name in enumerate(_CHI2_STREAMS):
            i = w.names.index(name)
            out[name] = {str(n): chi2_exceedance(truth[i], int(m[i]), n, draws=plan["chi2_draws"],
                                                 seed=seed * 1_000 + 100 + 10 * k + j)
                         for j, n in enumerate(_CHI2_WINDOWS)}
        return out

    section("chi2_exceedance", chi2)
    idx = [w.names.index(n) for n in _CUSUM_STREAMS]
    section("cusum_exceedance", lambda: cusum_exceedance(truth[idx], m[idx], list(_CUSUM_STREAMS),
                                                         copies=plan["cusum_copies"], rows=plan["cusum_rows"],
                                                         step_rows=STEP_ROWS, seed=seed * 1_000 + 7))

    section("labels", lambda: _labels(plan, seed))
    return _finish(report, out)


def _labels(plan: dict, seed: int) -> dict:
    """Label errors 5 % -> 10 %: fleet's CUSUM (with and without a baseline), its stable false alarms and
    design sweep, and river's detectors on the same streams."""
    lt = plan["label_trials"]
    out = {"fleet": label_onsets(trials=lt, seed=seed * 1_000 + 8),
           "fleet_burn_in": label_onsets(trials=lt, seed=seed * 1_000 + 8, burn_in=True)}
    for key in ("fleet", "fleet_burn_in"):
        out[key]["summary"] = delay_summary(out[key]["delays"], 1_000)
    out["stable"] = label_stable(trials=plan["label_stable_trials"], labels=1_500_000, seed=seed * 1_000 + 9)
    out["looser_targets"] = [label_stable(trials=max(plan["label_stable_trials"] // 10, 1), labels=1_500_000,
                                          seed=seed * 1_000 + 10, config=LabelConfig(false_alarm_labels=f))
                             for f in (1e4, 1e5)]
    if plan["label_sweep"]:  # the design choice: h = ln(target) and the baseline margin z
        out["design_sweep"] = []
        for target in (1e6, 1e7, 1e8):
            for z in (1.0, 1.645, 2.0):
                cfg = LabelConfig(false_alarm_labels=target, baseline_margin_sd=z)
                r = label_onsets(trials=lt, seed=seed * 1_000 + 11, config=cfg)
                st = label_stable(trials=10, labels=1_500_000, seed=seed * 1_000 + 12, config=cfg)
                out["design_sweep"].append({"false_alarm_labels": target, "baseline_margin_sd": z,
                                            "summary": delay_summary(r["delays"], 1_000),
                                            "false_alarms_before_onset": r["false_alarms_before_onset"],
                                            "stable_alarms": st["alarms"], "stable_labels": st["labels"]})
    out["river"] = {}
    for name in ("ADWIN", "DDM", "PageHinkley"):
        r = river_onsets(name, trials=lt, seed=seed * 1_000 + 8)
        r["summary"] = delay_summary(r["delays"], 1_000)
        r["stable"] = river_stable(name, trials=plan["river_stable_trials"], labels=1_500_000,
                                   seed=seed * 1_000 + 9)
        out["river"][name] = r
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _finish(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False))
    (out / "summary.md").write_text(markdown(report))
    try:
        plot_delays(report, out / "delays.png")
    except Exception as exc:  # the figures are data too; a plot failure must not lose them
        report["errors"].append({"section": "plot", "error": f"{type(exc).__name__}: {exc}"})
        (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift_trials", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer trials and rows: a smoke run under 2 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every trial")
    parser.add_argument("--labels-only", action="store_true", help="only the label-error section (under a minute)")
    args = parser.parse_args(argv)
    report = run(args.quick, args.out, args.seed, labels_only=args.labels_only)
    print(markdown(report))
    print(f"\n{args.out / 'report.json'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
