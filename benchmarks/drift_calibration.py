"""Calibration of the drift detector's false alarms by multinomial simulation.

The truth is the fraud traffic's bin shares per stream (`FraudWorld.true_probabilities` of the
stable pool). Each run draws a fresh reference histogram per stream from its m rows (32,000
training rows for the features, 8,000 held-out rows for the score and PCA streams) and live
step histograms from the true shares, independently per stream and step, then runs:
- `version_runs`: the real `VersionDrift` at a target F for a number of rows: its alarms are all
  false; counted per F rows with a Poisson 95 % upper bound.
- `chi2_exceedance`: single windows against single references: how often the PSI and the JS
  distance exceed their thresholds at alpha = 1e-3, 1e-4, 1e-5 (the chi^2 tail approximation,
  measured rather than assumed), per stream type and window size.
- `cusum_exceedance`: the ridit CUSUMs alone at moderate h: false crossings per row against
  Lorden's bound e^-h.
"""

from __future__ import annotations

import math
import time

import numpy as np

from serving.monitoring.detectors import RiditCusum
from serving.monitoring.drift import DriftConfig, StreamReference, VersionDrift, js_threshold, psi_threshold, \
    window_stats

__all__ = ["poisson_upper", "clopper_pearson", "version_runs", "chi2_exceedance", "cusum_exceedance"]


def poisson_upper(count: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound of a Poisson mean after seeing `count` events."""
    from scipy.stats import chi2

    return float(chi2.ppf(level, 2 * (count + 1)) / 2)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    return [float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0, float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0]


def _padded(p: np.ndarray) -> np.ndarray:
    """Shares [S, b] as live-bin shares [S, b + 2] (no mass under or over the end edges: folding is a no-op)."""
    out = np.zeros((p.shape[0], p.shape[1] + 2))
    out[:, 1:-1] = p
    return out / out.sum(axis=1, keepdims=True)


def version_runs(p: np.ndarray, m: np.ndarray, names: list[str], *, false_alarm_rows: float, rows_per_run: int,
                 runs: int, step_rows: int, seed: int, block: int = 2_000) -> dict:
    """`runs` versions (fresh references), each fed `rows_per_run` stable rows in steps of `step_rows`, one step
    a second: false alarms per `false_alarm_rows` rows, with a Poisson 95 % upper bound."""
    config = DriftConfig(false_alarm_rows=false_alarm_rows)
    live = _padded(p)
    s = p.shape[0]
    alarms, by = 0, {}
    started = time.perf_counter()
    steps = rows_per_run // step_rows
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        refs = [StreamReference(n, "x", rng.multinomial(int(mi), pi)) for n, mi, pi in zip(names, m, p)]
        vd = VersionDrift(refs, config)
        clock = 0.0
        for first in range(0, steps, block):
            draws = rng.multinomial(step_rows, live, size=(min(block, steps - first), s))
            for counts in draws:
                for event in vd.add(counts, step_rows, clock):
                    if event["state"] == "alarm":
                        alarms += 1
                        key = f"{event['detector']}/{event['statistic']}"
                        by[key] = by.get(key, 0) + 1
                clock += 1.0
    rows = steps * step_rows * runs
    per = rows / false_alarm_rows
    return {"false_alarm_rows": false_alarm_rows, "runs": runs, "rows": rows, "step_rows": step_rows,
            "multiples_of_target": per, "alarms": alarms, "by_detector": by,
            "alarms_per_target_rows": alarms / per, "upper95_per_target_rows": poisson_upper(alarms) / per,
            "seconds": time.perf_counter() - started}


def chi2_exceedance(p: np.ndarray, m: int, n: int, *, draws: int, alphas=(1e-3, 1e-4, 1e-5), seed: int,
                    batch: int = 100_000) -> dict:
    """Exceedance rates of the PSI and JS thresholds by one window of n rows against one reference of m rows,
    both drawn from shares p [b], over `draws` independent pairs."""
    rng = np.random.default_rng(seed)
    hits = {a: [0, 0] for a in alphas}
    for first in range(0, draws, batch):
        size = min(batch, draws - first)
        ref = rng.multinomial(m, p, size=size)
        win = rng.multinomial(n, p, size=size)
        st = window_stats(win, ref, DriftConfig().smoothing)
        for a in alphas:
            hits[a][0] += int(np.sum(st["psi"] > psi_threshold(st["n"], st["m"], st["b_eff"], a)))
            hits[a][1] += int(np.sum(st["js"] > js_threshold(st["n"], st["m"], st["b_eff"], a)))
    out = {}
    for a in alphas:
        psi_k, js_k = hits[a]
        out[f"{a:g}"] = {"alpha": a, "draws": draws, "psi_exceed": psi_k, "js_exceed": js_k,
                         "psi_rate_over_alpha": psi_k / draws / a, "js_rate_over_alpha": js_k / draws / a,
                         "psi_ratio_ci95": [x / a for x in clopper_pearson(psi_k, draws)],
                         "js_ratio_ci95": [x / a for x in clopper_pearson(js_k, draws)]}
    return out


def cusum_exceedance(p: np.ndarray, m: np.ndarray, kinds: list[str], *, thresholds=(6.0, 8.0, 10.0, 12.0),
                     copies: int, rows: int, step_rows: int, seed: int, block: int = 500) -> dict:
    """Ridit CUSUMs (the configured design, only h varied) on stable multinomial steps: crossings per row of
    each stream kind against e^-h. `copies` streams of each kind, each with a fresh reference."""
    cfg = DriftConfig()
    rng = np.random.default_rng(seed)
    probs = np.repeat(p, copies, axis=0)
    ms = np.repeat(m, copies)
    ref = np.stack([rng.multinomial(int(mi), pi) for mi, pi in zip(ms, probs)])
    mask = np.ones_like(ref, dtype=bool)
    cusums = {h: RiditCusum(ref, mask, threshold=h, design_shift_sd=cfg.design_shift_sd,
                            reference_margin_sd=cfg.reference_margin_sd,
                            variance_margin_sd=cfg.variance_margin_sd) for h in thresholds}
    crossings = {h: np.zeros(len(ref), np.int64) for h in thresholds}
    steps = rows // step_rows
    for first in range(0, steps, block):
        draws = rng.multinomial(step_rows, probs, size=(min(block, steps - first), len(probs)))
        for counts in draws:
            for h, c in cusums.items():
                up, down = c.update(counts, 0.0)
                crossings[h] += up.astype(np.int64) + down.astype(np.int64)
    out = {}
    for h in thresholds:
        per_kind = {}
        for j, kind in enumerate(kinds):
            k = int(crossings[h][j * copies:(j + 1) * copies].sum())
            cusum_rows = 2 * copies * steps * step_rows  # two CUSUMs per stream
            per_kind[kind] = {"crossings": k, "cusum_rows": cusum_rows, "rate_per_row": k / cusum_rows,
                              "upper95_per_row": poisson_upper(k) / cusum_rows, "bound_per_row": math.exp(-h)}
        out[f"{h:g}"] = per_kind
    return out
