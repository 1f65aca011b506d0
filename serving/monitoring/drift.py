"""Drift of a version's live traffic from its reference: calibrated alarms per histogram stream.

The monitor feeds `VersionDrift.add` about once a second per model version with the merged
histogram counts of the rows served since the last step, for S streams (each input feature,
the output score, the PCA reconstruction error; `serving.monitoring.reference`), and gets back
the state changes (ok -> alarm, alarm -> ok) as plain-JSON events. `LabelErrorDetector` (in
`detectors`, re-exported here) does the same for prediction errors once labels arrive. Pure
NumPy and `scipy.special`; no Ray, no I/O.

Notation: a stream's reference histogram r (b bins, m rows, end bins holding the outliers), a
window's counts c (n rows), `F` = `false_alarm_rows` (the target: at most one false alarm, all
streams together, per F rows of a version), S streams.

The false-alarm budget. A fraction w = `window_share` of the rate 1/F goes to the window tests,
the rest to the CUSUMs. Both bounds are unions over every test, valid whatever the dependence
between streams, between overlapping windows and on the shared reference:
  windows: 4S tests (PSI and JS distance, over the rows window and the time window) evaluated at
    every step; an evaluation that follows `new_rows` rows spends alpha = new_rows * w / (F * 4S),
    so the expected number of false crossings per row is at most w / F.
  CUSUMs: 2S (up and down per stream), each with h = ln(2S * F / (1 - w)): Lorden's bound gives at
    most e^-h false alarms per row for each, (1 - w) / F together.

1. Window statistics (per stream, over the rows window — the latest steps adding up to at least
   `window_rows` rows — and the time window — the steps of the last `window_s` seconds). Bins
   empty in both the reference and the window drop out; b_eff bins remain. Shares are smoothed:
       a_k = (c_k + s) / (n + s * b_eff),   e_k = (r_k + s) / (m + s * b_eff),   s = `smoothing` (1)
       PSI = sum_k (a_k - e_k) ln(a_k / e_k)                      (the symmetric KL divergence)
       JS  = sqrt( 1/2 sum_k a_k ln(a_k / M_k) + 1/2 sum_k e_k ln(e_k / M_k) ),  M = (a + e) / 2
   With no drift n_eff * PSI is asymptotically chi^2(b_eff - 1) (it is Pearson's two-sample
   statistic to first order), n_eff = n m / (n + m) (the reference is a sample of m rows too), and
   the JS divergence is PSI / 8 to the same order. So, q = the upper-alpha quantile of
   chi^2(b_eff - 1) (`scipy.special.chdtri`):
       PSI threshold = q / n_eff,      JS-distance threshold = sqrt(q / (8 n_eff))
   A window with fewer than `min_rows` rows in a stream is reported but not judged. Why s = 1 and
   not 0.5: with s = 0.5 a window of 1,000 rows of a normal feature exceeds the PSI threshold
   1.2x, 1.5x, 1.7x as often as alpha = 1e-3, 1e-4, 1e-5 (a bin expected to hold 10 rows that
   holds 0 weighs ln 20), a tail growing heavier as alpha shrinks; with s = 1 the continuous,
   score and PCA streams stay at or under alpha from 1,000 to 150,000 rows, at a negligible cost
   in power on large windows. Few-bin discrete streams still reach 1.1-1.7x alpha at 1e-5 (a
   4-bin count feature in 1,000-row windows); the union bound's slack over overlapping windows
   absorbs it: the whole detector's measured false alarms are 0.01-0.2 of the target
   (`benchmarks.drift_calibration`).
2. Sequential: a two-sided CUSUM on ridits per stream (`detectors.RiditCusum`). A row in bin k
   scores u_k = (R_{k-1} + r_k / 2) / m (R the cumulative reference counts); under the reference
   u has mean 1/2 and variance sigma^2 = (1 - sum p_k^3) / 12 (ties corrected, p = r / m). A step
   with counts c adds S = sum_k c_k u_k over its n rows:
       G+ <- max(0, G+ + lambda+ (S - n (1/2 + eps)) - n psi+(lambda+))
       G- <- max(0, G- + lambda- (n (1/2 - eps) - S) - n psi-(lambda-))
       psi(lambda) = sigma_hat^2 / c^2 (e^(lambda c) - 1 - lambda c)      (Bennett's bound)
   c bounds u - E u above: c+ = max_k u_k - 1/2 + eps, c- = 1/2 + eps - min_k u_k. While the
   true mean ridit lies within 1/2 +- eps and its variance is at most sigma_hat^2, exp(G) is a
   nonnegative supermartingale with no normal approximation, so (Lorden; Shiryaev-Roberts and
   optional stopping) the mean run to a false alarm is at least e^h rows. The margins cover the
   reference's own sampling error: eps = c_eps sigma / sqrt(m) (`reference_margin_sd`; the
   mean ridit of the true distribution differs from 1/2 by about sigma / sqrt(m)), and
   sigma_hat^2 = sigma^2 + c_var sqrt((mu_4 - sigma^4) / m) (`variance_margin_sd`). lambda is
   Bennett-optimal for a design excess delta* - eps over the margin (at least delta* / 2):
       lambda = ln(1 + c (delta* - eps) / sigma_hat^2) / c,   delta* = d* sigma   (`design_shift_sd`)
   d* = 0.1: a 0.1 sd mean shift of a normal feature moves the mean ridit by
   Phi(0.1 / sqrt 2) - 1/2 = 0.0282 = 0.098 sigma, of a binary feature by exactly 0.1 sigma.
   A statistic reaching h is an alarm and restarts from 0; its rows since it last stood at 0 are
   the onset estimate reported as the event's `rows`.
3. State per stream: "ok" -> "alarm" on any crossing (a CUSUM reaching h, a judged window over a
   threshold); "alarm" -> "ok" after `clear_after_rows` rows with no crossing. One event per change.
4. Label errors (`detectors.LabelErrorDetector`): a one-sided Bernoulli CUSUM of the exact
   log-likelihood ratio, ln(p1 / p0) for a wrong prediction and ln((1 - p1) / (1 - p0)) for a right
   one, h = ln(`false_alarm_labels`). p0 is the Wilson upper bound (z = `baseline_margin_sd`) of
   the baseline rate seen on `baseline_rows` labels (from the version's metadata, or the first
   `burn_in` labels), so an optimistic baseline does not raise false alarms; p1 = `design_ratio`
   x p0 (capped halfway to 1).

Events: {"stream", "kind", "state": "alarm"|"ok", "detector": "cusum"|"rows_window"|"time_window",
"statistic": "ridit_up"|"ridit_down"|"psi"|"js_distance", "value", "threshold", "since" (unix s,
the start of the new state), "rows" (alarm: the CUSUM's rows since its onset estimate or the
window's rows; ok: rows served during the alarm), "evidence": {...}}: plain JSON, None for
missing numbers. Measured calibration, delays and cost: `python -m benchmarks.drift_trials`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.special import chdtri

from serving.monitoring.detectors import LabelConfig, LabelErrorDetector, RiditCusum, json_number

__all__ = [
    "DriftConfig", "StreamReference", "VersionDrift", "LabelConfig", "LabelErrorDetector", "window_stats",
    "psi", "js_distance", "psi_threshold", "js_threshold", "effective_rows",
]

_WINDOWS = ("rows", "time")


@dataclass(frozen=True)
class DriftConfig:
    """The drift detector's targets and design (formulas in the module doc).

    false_alarm_rows: at most one false alarm, all streams together, per this many rows of a version.
    window_rows / window_s: the rows window (the latest steps adding up to at least this many rows)
      and the time window (the steps of the last window_s seconds).
    min_rows: a window with fewer rows in a stream is reported, not judged.
    clear_after_rows: an alarm clears after this many rows with no new crossing.
    max_steps: steps kept for the windows (bounded memory); a window needing more is cut short.
    window_share: the share of the false-alarm budget the window tests spend (the CUSUMs the rest).
    design_shift_sd: d*, the shift the CUSUMs are tuned for, in ridit standard deviations.
    reference_margin_sd / variance_margin_sd: c_eps and c_var, the margins (in standard errors of
      an m-row reference) for the reference's sampling error in the ridit mean and variance.
    smoothing: s, added to every bin count of the PSI and JS shares.
    """

    false_alarm_rows: float = 864e6
    window_rows: int = 10_000
    window_s: float = 300.0
    min_rows: int = 1_000
    clear_after_rows: int = 20_000
    max_steps: int = 4_096
    window_share: float = 0.5
    design_shift_sd: float = 0.1
    reference_margin_sd: float = 3.0
    variance_margin_sd: float = 3.0
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        checks = {"false_alarm_rows": self.false_alarm_rows > 1, "window_rows": self.window_rows >= 1,
                  "window_s": self.window_s > 0, "min_rows": self.min_rows >= 1,
                  "clear_after_rows": self.clear_after_rows >= 1, "max_steps": self.max_steps >= 2,
                  "window_share": 0 < self.window_share < 1, "design_shift_sd": self.design_shift_sd > 0,
                  "reference_margin_sd": self.reference_margin_sd >= 0,
                  "variance_margin_sd": self.variance_margin_sd >= 0, "smoothing": self.smoothing > 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"DriftConfig.{name} = {getattr(self, name)!r} is out of range "
                                 "(rows, steps and seconds > 0; 0 < window_share < 1; margins >= 0)")


@dataclass(frozen=True)
class StreamReference:
    """One stream's reference: `counts` int64 [b] (end bins hold the outliers); `edges` [b + 1] optional,
    only to name the bins in an alarm's evidence. `kind` is "feature", "score" or "pca"."""

    name: str
    kind: str
    counts: np.ndarray
    edges: np.ndarray | None = None


def effective_rows(n, m):
    """n_eff = n m / (n + m): the rows a window of n weighs against a reference of m (0 for an empty window)."""
    n = np.asarray(n, dtype=np.float64)
    return np.where(n > 0, n * m / np.maximum(n + m, 1e-300), 0.0)


def window_stats(window: np.ndarray, reference: np.ndarray, smoothing: float = 1.0,
                 mask: np.ndarray | None = None) -> dict:
    """PSI, JS distance, b_eff and per-bin PSI terms of window counts [..., B] against reference counts [..., B].

    Bins empty in both (or outside `mask`) drop out. Vectorised over leading axes.
    """
    c = np.asarray(window, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    present = (c > 0) | (r > 0)
    if mask is not None:
        present &= mask
    b_eff = present.sum(axis=-1)
    n, m = np.sum(c * present, axis=-1), np.sum(r * present, axis=-1)
    a = np.where(present, (c + smoothing) / (n + smoothing * b_eff)[..., None], 1.0)
    e = np.where(present, (r + smoothing) / (m + smoothing * b_eff)[..., None], 1.0)
    log_a, log_e = np.log(a), np.log(e)
    terms = (a - e) * (log_a - log_e)
    log_mid = np.log((a + e) / 2.0)
    jsd = 0.5 * np.sum(np.where(present, a * (log_a - log_mid) + e * (log_e - log_mid), 0.0), axis=-1)
    return {"psi": terms.sum(axis=-1), "js": np.sqrt(np.maximum(jsd, 0.0)), "b_eff": b_eff, "n": n, "m": m,
            "terms": terms, "a": a, "e": e}


def psi(window: np.ndarray, reference: np.ndarray, smoothing: float = 1.0) -> float:
    """PSI of one window's counts [b] against a reference's [b] (module doc, formula 1)."""
    return float(window_stats(window, reference, smoothing)["psi"])


def js_distance(window: np.ndarray, reference: np.ndarray, smoothing: float = 1.0) -> float:
    """Jensen-Shannon distance (natural log) of one window's counts [b] against a reference's [b]."""
    return float(window_stats(window, reference, smoothing)["js"])


def psi_threshold(n, m, b_eff, alpha):
    """q / n_eff: the PSI a window of n rows exceeds with probability alpha under no drift (chi^2 approximation)."""
    dof = np.maximum(np.asarray(b_eff, dtype=np.float64) - 1.0, 1.0)
    n_eff = effective_rows(n, m)
    return np.where(n_eff > 0, chdtri(dof, alpha) / np.where(n_eff > 0, n_eff, 1.0), np.inf)


def js_threshold(n, m, b_eff, alpha):
    """sqrt(q / (8 n_eff)): the JS distance matching `psi_threshold` (JS divergence ~ PSI / 8)."""
    return np.sqrt(np.asarray(psi_threshold(n, m, b_eff, alpha)) / 8.0)


class _Window:
    """Running sums of the newest `steps` steps of the shared ring."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.counts = np.zeros(shape, dtype=np.int64)
        self.rows = 0
        self.steps = 0

    def push(self, counts: np.ndarray, rows: int) -> None:
        self.counts += counts
        self.rows += rows
        self.steps += 1

    def pop(self, counts: np.ndarray, rows: int) -> None:
        self.counts -= counts
        self.rows -= rows
        self.steps -= 1


class VersionDrift:
    """The drift state of one model version: windows, CUSUMs and alarm states of its S streams.

    `add(counts, rows, now_s)` takes one step: `counts` int64 [S, b + 2] (live, unfolded:
    underflow, b bins, overflow; streams in `references` order) when every stream has the same b,
    or a list of S int arrays [b_s + 2] when they differ; `rows` the rows served in the step.
    """

    def __init__(self, references: list[StreamReference], config: DriftConfig = DriftConfig()) -> None:
        if not references:
            raise ValueError("VersionDrift needs at least one stream reference")
        self.config = config
        self.references = list(references)
        self.bins = [int(np.asarray(ref.counts).size) for ref in references]
        if min(self.bins) < 1:
            raise ValueError("every reference histogram needs at least one bin")
        s, b = len(references), max(self.bins)
        self.reference = np.zeros((s, b), dtype=np.int64)
        self.mask = np.zeros((s, b), dtype=bool)
        for i, ref in enumerate(references):
            counts = np.asarray(ref.counts, dtype=np.int64).reshape(-1)
            if counts.min() < 0 or counts.sum() <= 0:
                raise ValueError(f"stream {ref.name!r}: reference counts must be >= 0 and add up to > 0")
            self.reference[i, :counts.size] = counts
            self.mask[i, :counts.size] = True
        self.m = self.reference.sum(axis=1).astype(np.float64)
        self.uniform = len(set(self.bins)) == 1
        self.alpha_per_row = config.window_share / (config.false_alarm_rows * 4 * s)
        self.cusum = RiditCusum(self.reference, self.mask,
                                threshold=math.log(2 * s * config.false_alarm_rows / (1 - config.window_share)),
                                design_shift_sd=config.design_shift_sd,
                                reference_margin_sd=config.reference_margin_sd,
                                variance_margin_sd=config.variance_margin_sd)
        self._steps: deque[tuple[np.ndarray, int, float]] = deque()
        self._windows = {"rows": _Window((s, b)), "time": _Window((s, b))}
        self.state = ["ok"] * s
        self.since: list[float | None] = [None] * s
        self.alarms = [0] * s
        self._last_crossing_rows = np.zeros(s)  # version rows at each stream's last crossing
        self._alarm_rows = np.zeros(s)  # version rows when each stream's alarm began
        self.rows_seen, self.steps_seen, self.updated_s = 0, 0, None
        self._last: dict | None = None  # the last evaluation, for report()

    # -- one step ---------------------------------------------------------------------------------

    def _fold(self, counts) -> np.ndarray:
        s, b = self.reference.shape
        if self.uniform and isinstance(counts, np.ndarray) and counts.ndim == 2:
            if counts.shape != (s, b + 2):
                raise ValueError(f"counts must be [{s}, {b + 2}] (underflow, {b} bins, overflow), "
                                 f"got {list(counts.shape)}")
            folded = counts[:, 1:-1].astype(np.int64)
            folded[:, 0] += counts[:, 0]
            folded[:, -1] += counts[:, -1]
        else:
            if len(counts) != s:
                raise ValueError(f"counts must hold one histogram per stream ({s}), got {len(counts)}")
            folded = np.zeros((s, b), dtype=np.int64)
            for i, (row, bins) in enumerate(zip(counts, self.bins)):
                row = np.asarray(row).reshape(-1)
                if row.size != bins + 2:
                    raise ValueError(f"stream {self.references[i].name!r}: counts need {bins + 2} entries, "
                                     f"got {row.size}")
                folded[i, :bins] = row[1:-1]
                folded[i, 0] += row[0]
                folded[i, bins - 1] += row[-1]
        if folded.min(initial=0) < 0:
            raise ValueError("counts must be >= 0")
        return folded

    def _slide(self, folded: np.ndarray, rows: int, now_s: float) -> None:
        cfg, steps = self.config, self._steps
        steps.append((folded, rows, now_s))
        by_rows, by_time = self._windows["rows"], self._windows["time"]
        by_rows.push(folded, rows)
        by_time.push(folded, rows)
        while by_rows.steps > 1:
            oldest = steps[len(steps) - by_rows.steps]
            if by_rows.rows - oldest[1] < cfg.window_rows:
                break
            by_rows.pop(oldest[0], oldest[1])
        while by_time.steps > 0:
            oldest = steps[len(steps) - by_time.steps]
            if oldest[2] > now_s - cfg.window_s:
                break
            by_time.pop(oldest[0], oldest[1])
        keep = max(by_rows.steps, by_time.steps)
        while len(steps) > keep or len(steps) > cfg.max_steps:
            oldest = steps.popleft()
            for window in (by_rows, by_time):
                if window.steps > len(steps):
                    window.pop(oldest[0], oldest[1])

    def add(self, counts, rows: int, now_s: float) -> list[dict]:
        """One step (see the class doc); returns this step's state changes as events (module doc)."""
        rows = int(rows)
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        folded = self._fold(counts)
        self._slide(folded, rows, float(now_s))
        self.rows_seen += rows
        self.steps_seen += 1
        self.updated_s = float(now_s)
        alpha = min(rows * self.alpha_per_row, 1.0)
        both = np.stack([self._windows["rows"].counts, self._windows["time"].counts])
        stats = window_stats(both, self.reference, self.config.smoothing, self.mask)
        q = chdtri(np.maximum(stats["b_eff"] - 1.0, 1.0), alpha) if alpha > 0 else np.full(stats["psi"].shape, np.inf)
        n_eff = effective_rows(stats["n"], self.m)
        judged = (stats["n"] >= self.config.min_rows) & (stats["b_eff"] >= 2) & (alpha > 0)
        psi_thr = np.where(n_eff > 0, q / np.where(n_eff > 0, n_eff, 1.0), np.inf)
        js_thr = np.sqrt(psi_thr / 8.0)
        over_psi = judged & (stats["psi"] > psi_thr)
        over_js = judged & (stats["js"] > js_thr)
        up, down = self.cusum.update(folded, now_s)
        self._last = {"stats": stats, "psi_thr": psi_thr, "js_thr": js_thr, "judged": judged, "alpha": alpha,
                      "rows": (self._windows["rows"].rows, self._windows["time"].rows),
                      "span_s": tuple(self._span(w) for w in _WINDOWS)}
        crossed = up | down | over_psi.any(axis=0) | over_js.any(axis=0)
        events = []
        for i in np.flatnonzero(crossed):
            self._last_crossing_rows[i] = self.rows_seen
            if self.state[i] == "ok":
                events.append(self._alarm(int(i), now_s, up[i], down[i], over_psi[:, i], over_js[:, i]))
        for i, state in enumerate(self.state):
            if state == "alarm" and self.rows_seen - self._last_crossing_rows[i] >= self.config.clear_after_rows:
                alarm_rows = int(self.rows_seen - self._alarm_rows[i])
                events.append(self._event(i, "ok", now_s, "none", "none", None, None, alarm_rows,
                                          {"alarm_since": self.since[i], "alarm_rows": alarm_rows}))
                self.state[i], self.since[i] = "ok", float(now_s)
        return events

    def retire(self, now_s: float, why: str) -> list[dict]:
        """Clear every alarm of a version that no longer gets traffic (a newer one took over): one "ok" event each.

        The statistics stay for the report; rows arriving later are judged as before.
        """
        events = []
        for i, state in enumerate(self.state):
            if state == "alarm":
                alarm_rows = int(self.rows_seen - self._alarm_rows[i])
                events.append(self._event(i, "ok", now_s, "retired", "none", None, None, alarm_rows,
                                          {"alarm_since": self.since[i], "alarm_rows": alarm_rows, "why": why}))
                self.state[i], self.since[i] = "ok", float(now_s)
        return events

    def _span(self, name: str) -> float:
        steps = self._windows[name].steps
        return self._steps[-1][2] - self._steps[len(self._steps) - steps][2] if steps else 0.0

    # -- events -----------------------------------------------------------------------------------

    def _alarm(self, i: int, now_s: float, up: bool, down: bool, over_psi: np.ndarray, over_js: np.ndarray) -> dict:
        last, cusum = self._last, self.cusum
        crossings = []  # (value / threshold, detector, statistic, value, threshold, rows)
        for side, hit, statistic in ((0, up, "ridit_up"), (1, down, "ridit_down")):
            if hit:
                value = (cusum.last_up if side == 0 else cusum.last_down)[i]
                crossings.append((value / cusum.threshold, "cusum", statistic, value, cusum.threshold,
                                  cusum.last_run_rows[side, i]))
        for w, name in enumerate(_WINDOWS):
            for hit, statistic, key, thr in ((over_psi[w], "psi", "psi", last["psi_thr"]),
                                             (over_js[w], "js_distance", "js", last["js_thr"])):
                if hit:
                    value = last["stats"][key][w, i]
                    crossings.append((value / thr[w, i], f"{name}_window", statistic, value, thr[w, i],
                                      last["stats"]["n"][w, i]))
        _, detector, statistic, value, threshold, rows = max(crossings, key=lambda c: c[0])
        evidence = {"crossings": [{"detector": c[1], "statistic": c[2], "value": json_number(c[3]),
                                   "threshold": json_number(c[4])} for c in crossings],
                    "cusum": self._cusum_evidence(i), "windows": self._window_report(i, bins=True)}
        self.state[i], self.since[i] = "alarm", float(now_s)
        self.alarms[i] += 1
        self._alarm_rows[i] = self.rows_seen
        return self._event(i, "alarm", now_s, detector, statistic, value, threshold, int(rows), evidence)

    def _event(self, i: int, state: str, now_s: float, detector: str, statistic: str, value, threshold,
               rows: int, evidence: dict) -> dict:
        return {"stream": self.references[i].name, "kind": self.references[i].kind, "state": state,
                "detector": detector, "statistic": statistic, "value": json_number(value),
                "threshold": json_number(threshold), "since": float(now_s), "rows": int(rows), "evidence": evidence}

    def _cusum_evidence(self, i: int) -> dict:
        c = self.cusum
        out = {}
        for side, name, value in ((0, "up", c.last_up[i]), (1, "down", c.last_down[i])):
            rows = c.last_run_rows[side, i]
            out[name] = {"value": json_number(value), "rows_since_onset": int(rows),
                         "onset_s": json_number(c.last_run_start_s[side, i]) if rows else None,
                         "mean_ridit_since_onset": json_number(c.last_run_sum[side, i] / rows) if rows else None}
        return {**out, "threshold": c.threshold, "reference_mean": 0.5, "margin": json_number(c.margin[i])}

    def _window_report(self, i: int, bins: bool = False) -> dict:
        last = self._last
        out = {}
        for w, name in enumerate(_WINDOWS):
            st = last["stats"]
            entry = {"rows": int(last["rows"][w]), "stream_rows": int(st["n"][w, i]),
                     "span_s": json_number(last["span_s"][w]), "judged": bool(last["judged"][w, i]),
                     "bins": int(st["b_eff"][w, i]), "psi": json_number(st["psi"][w, i]),
                     "psi_threshold": json_number(last["psi_thr"][w, i]), "js_distance": json_number(st["js"][w, i]),
                     "js_threshold": json_number(last["js_thr"][w, i]), "alpha": json_number(last["alpha"])}
            if bins:
                entry["top_bins"] = self._top_bins(i, w)
            out[name] = entry
        return out

    def _top_bins(self, i: int, w: int, k: int = 3) -> list[dict]:
        st, edges = self._last["stats"], self.references[i].edges
        terms = st["terms"][w, i, :self.bins[i]]
        out = []
        for j in np.argsort(terms)[::-1][:k]:
            if terms[j] <= 0:
                break
            rng = None if edges is None else [json_number(edges[j]), json_number(edges[j + 1])]
            out.append({"bin": int(j), "range": rng, "reference_share": json_number(st["e"][w, i, j]),
                        "window_share": json_number(st["a"][w, i, j]), "psi_term": json_number(terms[j])})
        return out

    # -- the report -------------------------------------------------------------------------------

    def report(self, now_s: float) -> dict:
        """JSON-able state of every stream as of the last step (module doc), plus totals.

        Per stream: name, kind, state, since, alarms, windows {"rows", "time"} (rows, span, PSI and
        JS distance with their thresholds, judged or not), cusum (up, down, threshold, design).
        `age_s` says how long ago the last step was.
        """
        streams = []
        for i, ref in enumerate(self.references):
            streams.append({"name": ref.name, "kind": ref.kind, "state": self.state[i], "since": self.since[i],
                            "alarms": self.alarms[i], "reference_rows": int(self.m[i]), "bins": self.bins[i],
                            "windows": self._window_report(i) if self._last else None,
                            "cusum": self.cusum.describe(i)})
        return {"streams": streams, "alarming": [s["name"] for s in streams if s["state"] == "alarm"],
                "rows": self.rows_seen, "steps": self.steps_seen, "updated_s": self.updated_s,
                "age_s": json_number(now_s - self.updated_s) if self.updated_s is not None else None,
                "config": {"false_alarm_rows": self.config.false_alarm_rows, "window_rows": self.config.window_rows,
                           "window_s": self.config.window_s, "min_rows": self.config.min_rows,
                           "clear_after_rows": self.config.clear_after_rows,
                           "cusum_threshold": self.cusum.threshold}}
