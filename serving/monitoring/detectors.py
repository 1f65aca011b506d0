"""Sequential change detectors with a calibrated false-alarm rate: a two-sided CUSUM on ridits, a Bernoulli CUSUM.

Both are CUSUMs whose exponential is a nonnegative supermartingale while nothing has changed,
so Lorden's bound (via the Shiryaev-Roberts statistic and Ville's inequality) holds without a
normal approximation: after a start or a reset, the expected number of observations before a
false alarm is at least e^h, and with a reset after each alarm the long-run false-alarm rate is
at most e^-h per observation. The formulas are in `serving.monitoring.drift`'s module doc; the
classes here hold the state. Pure NumPy.

- `RiditCusum`: one two-sided CUSUM per histogram stream, vectorised over the streams, fed the
  folded bin counts of each step (the monitor's ~1 s of traffic).
- `LabelErrorDetector`: a one-sided Bernoulli CUSUM on a version's prediction errors (labels
  joined to predictions), with its baseline error rate from the version's metadata or from a
  burn-in, plus the recent error rate for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RiditCusum", "LabelConfig", "LabelErrorDetector", "ridits", "bennett_psi", "wilson_upper", "json_number"]


def json_number(value) -> float | None:
    """A plain float for JSON, None for a missing, NaN or infinite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def ridits(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """(u [b], tie-corrected variance) of a reference histogram: u_k = (R_{k-1} + r_k / 2) / m.

    A row drawn from the reference has mean ridit 1/2 exactly and variance (1 - sum p_k^3) / 12,
    p_k = r_k / m: computed here directly as sum p_k (u_k - 1/2)^2. Empty bins get the ridit of
    their position (R_{k-1} / m), which a live row landing there is scored with.
    """
    counts = np.asarray(counts, dtype=np.float64)
    m = counts.sum(axis=-1, keepdims=True)
    if np.any(m <= 0):
        raise ValueError("a reference histogram needs at least one row")
    below = np.cumsum(counts, axis=-1) - counts
    u = (below + counts / 2.0) / m
    variance = np.sum(counts / m * (u - 0.5) ** 2, axis=-1)
    return u, variance


def bennett_psi(lam: np.ndarray, variance: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Bennett's bound on ln E exp(lam (X - mu)) for X - mu <= bound, Var X <= variance, lam >= 0.

    psi(lam) = variance / bound^2 * (exp(lam bound) - 1 - lam bound); it tends to the Gaussian
    variance lam^2 / 2 as bound -> 0 and is larger otherwise, which is what makes it a bound.
    """
    lb = lam * bound
    return variance / bound**2 * np.expm1(lb) - variance / bound**2 * lb


class RiditCusum:
    """Two-sided CUSUMs on the mean ridit of S streams' step histograms (one up, one down per stream).

    `reference` int64 [S, B]: the reference histograms, zero-padded past each stream's bins
    (`mask` [S, B] says which bins are real). `threshold` is h (nats, the same for every CUSUM);
    `design_shift_sd` d* (the shift tuned for, in units of the stream's ridit sd);
    `reference_margin_sd` c_eps and `variance_margin_sd` c_var size the margins for the
    reference's own sampling error (see the drift module doc). A stream whose reference holds a
    single bin has no ridit spread and no CUSUM (its lambdas are 0).
    """

    def __init__(self, reference: np.ndarray, mask: np.ndarray, *, threshold: float, design_shift_sd: float,
                 reference_margin_sd: float, variance_margin_sd: float) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        self.m = ref.sum(axis=1)
        u, variance = ridits(ref)
        self.u = np.where(mask, u, 0.5)
        sd = np.sqrt(variance)
        p = ref / self.m[:, None]
        fourth = np.sum(p * (u - 0.5) ** 4, axis=1)
        # sigma_hat^2: the variance plus c_var standard errors of its estimate from m rows
        self.variance = variance + variance_margin_sd * np.sqrt(np.maximum(fourth - variance**2, 0.0) / self.m)
        self.margin = reference_margin_sd * sd / np.sqrt(self.m)  # eps
        self.threshold = float(threshold)
        self.design_shift = design_shift_sd * sd  # delta*, ridit units
        u_max = np.where(mask, u, -np.inf).max(axis=1)
        u_min = np.where(mask, u, np.inf).min(axis=1)
        self.bound_up = u_max - 0.5 + self.margin  # X - mu <= c when |mu - 1/2| <= eps
        self.bound_down = 0.5 + self.margin - u_min
        excess = np.maximum(self.design_shift - self.margin, 0.5 * self.design_shift)
        live = variance > 1e-12
        self.lam_up = np.where(live, np.log1p(self.bound_up * excess / np.where(live, self.variance, 1.0))
                               / self.bound_up, 0.0)
        self.lam_down = np.where(live, np.log1p(self.bound_down * excess / np.where(live, self.variance, 1.0))
                                 / self.bound_down, 0.0)
        self.psi_up = bennett_psi(self.lam_up, self.variance, self.bound_up)
        self.psi_down = bennett_psi(self.lam_down, self.variance, self.bound_down)
        s = len(ref)
        self.up = np.zeros(s)
        self.down = np.zeros(s)
        self.run_rows = np.zeros((2, s))  # rows since each statistic last stood at 0 (the onset estimate)
        self.run_sum = np.zeros((2, s))  # their ridit sum
        self.run_start_s = np.full((2, s), np.nan)

    @property
    def streams(self) -> int:
        return len(self.up)

    def update(self, counts: np.ndarray, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Add one step's folded counts [S, B]; return (crossed_up, crossed_down) bool [S].

        A statistic that reaches h is reported crossed and restarts from 0 (the reset after an
        alarm); `last_up` / `last_down` keep the values it reached and `last_run_*` the rows and
        ridit sum since its onset estimate, for the event's evidence.
        """
        n = counts.sum(axis=1).astype(np.float64)
        score = np.einsum("sb,sb->s", counts, self.u)
        up = self.up + self.lam_up * (score - n * (0.5 + self.margin)) - n * self.psi_up
        down = self.down + self.lam_down * (n * (0.5 - self.margin) - score) - n * self.psi_down
        for side, value in ((0, up), (1, down)):
            started = (self.run_rows[side] == 0) & (value > 0)
            self.run_start_s[side] = np.where(started, now_s, self.run_start_s[side])
            alive = value > 0
            self.run_rows[side] = np.where(alive, self.run_rows[side] + n, 0.0)
            self.run_sum[side] = np.where(alive, self.run_sum[side] + score, 0.0)
        self.last_up, self.last_down = np.maximum(up, 0.0), np.maximum(down, 0.0)
        self.last_run_rows, self.last_run_sum = self.run_rows.copy(), self.run_sum.copy()
        self.last_run_start_s = self.run_start_s.copy()
        crossed_up, crossed_down = up >= self.threshold, down >= self.threshold
        self.up = np.where(crossed_up, 0.0, self.last_up)
        self.down = np.where(crossed_down, 0.0, self.last_down)
        for side, crossed in ((0, crossed_up), (1, crossed_down)):
            self.run_rows[side][crossed] = 0.0
            self.run_sum[side][crossed] = 0.0
        return crossed_up, crossed_down

    def describe(self, i: int) -> dict:
        """Stream i's CUSUM parameters and current values, JSON-able."""
        return {"up": json_number(self.up[i]), "down": json_number(self.down[i]), "threshold": self.threshold,
                "lambda_up": json_number(self.lam_up[i]), "lambda_down": json_number(self.lam_down[i]),
                "design_shift": json_number(self.design_shift[i]), "margin": json_number(self.margin[i]),
                "variance_bound": json_number(self.variance[i]),
                "active": bool(self.lam_up[i] > 0)}


# -- label errors ---------------------------------------------------------------------------------


def wilson_upper(errors: float, n: float, z: float) -> float:
    """Wilson score upper bound (z standard errors) of a rate seen as `errors` of `n`; 0 < bound < 1 for n > 0."""
    if n <= 0:
        raise ValueError(f"a baseline needs at least one label, got {n}")
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min((centre + spread) / (1 + z2 / n), 1.0 - 1e-9)


@dataclass(frozen=True)
class LabelConfig:
    """The label-error detector's design (see the drift module doc, "label errors").

    false_alarm_labels: at most one false alarm per this many labels of a version (h = ln of it).
    design_ratio: the error rate tuned for, as a multiple of the baseline (p1 = ratio x p0).
    baseline_margin_sd: z of the Wilson upper bound taken as p0, for the baseline's own sampling error.
    burn_in: labels that estimate p0 when the version has no baseline (no alarm meanwhile).
    recent_labels: how many of the latest labels the reported recent error rate covers.
    clear_after_labels: an alarm clears after this many labels with no new crossing.
    """

    false_alarm_labels: float = 1e8
    design_ratio: float = 2.0
    baseline_margin_sd: float = 1.645
    burn_in: int = 2_000
    recent_labels: int = 1_000
    clear_after_labels: int = 2_000

    def __post_init__(self) -> None:
        if not self.false_alarm_labels > 1:
            raise ValueError(f"false_alarm_labels must be > 1, got {self.false_alarm_labels}")
        if not self.design_ratio > 1:
            raise ValueError(f"design_ratio must be > 1, got {self.design_ratio}")
        if not self.baseline_margin_sd >= 0:
            raise ValueError(f"baseline_margin_sd must be >= 0, got {self.baseline_margin_sd}")
        for name in ("burn_in", "recent_labels", "clear_after_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class LabelErrorDetector:
    """One-sided Bernoulli CUSUM on a version's prediction errors: alarms when the error rate rises.

    `baseline_rate`: the version's held-out error rate (metadata `monitoring.label_error.rate`)
    measured on `baseline_rows` labels; None: estimate it from the first `config.burn_in` labels.
    Feed `add` the errors (bool, True = wrong) in prediction-time order as labels arrive.
    """

    def __init__(self, baseline_rate: float | None, baseline_rows: int, config: LabelConfig = LabelConfig()) -> None:
        self.config = config
        self.threshold = math.log(config.false_alarm_labels)
        self.labels = 0  # every label added, burn-in included
        self.errors = 0
        self.statistic = 0.0
        self.state, self.since, self.alarm_count = "ok", None, 0
        self.crossings = 0  # every time the CUSUM reached h (an alarm, or a renewal of one)
        self._seen = 0  # labels run through the CUSUM (after the burn-in)
        self._last_crossing_at, self._alarm_at = 0, 0
        self._run_labels, self._run_errors, self._run_start_s = 0, 0, None
        self._recent = np.zeros(config.recent_labels, dtype=bool)
        self._recent_pos, self._recent_n = 0, 0
        self._burn: list[np.ndarray] = []
        self._burn_n = 0
        self.baseline_rate, self.baseline_rows = None, 0
        self.p0 = self.p1 = None
        if baseline_rate is not None:
            if not 0.0 <= baseline_rate < 1.0 or baseline_rows < 1:
                raise ValueError(f"baseline_rate must lie in [0, 1) with baseline_rows >= 1, got {baseline_rate} "
                                 f"and {baseline_rows}")
            self._set_baseline(float(baseline_rate), int(baseline_rows))

    def _set_baseline(self, rate: float, rows: int) -> None:
        self.baseline_rate, self.baseline_rows = rate, rows
        self.p0 = wilson_upper(rate * rows, rows, self.config.baseline_margin_sd)
        self.p1 = min(self.config.design_ratio * self.p0, (1.0 + self.p0) / 2.0)
        self.llr_error = math.log(self.p1 / self.p0)
        self.llr_correct = math.log((1.0 - self.p1) / (1.0 - self.p0))

    def add(self, errors: np.ndarray, now_s: float) -> list[dict]:
        """Add labelled predictions (bool [n], True = wrong, oldest first); return this call's state changes."""
        errors = np.asarray(errors).reshape(-1).astype(bool, copy=False)
        self._remember(errors)
        self.labels += errors.size
        self.errors += int(errors.sum())
        if self.baseline_rate is None:
            need = self.config.burn_in - self._burn_n
            self._burn.append(errors[:need])
            self._burn_n += min(need, errors.size)
            errors = errors[need:]
            if self._burn_n < self.config.burn_in:
                return []
            burn = np.concatenate(self._burn)
            self._burn = []
            self._set_baseline(float(burn.mean()), burn.size)
        events: list[dict] = []
        while errors.size:
            # G_t = max(0, G_{t-1} + x_t) for the whole chunk at once (Lindley): S_t - min(-G_0, min_k<=t S_k)
            total = np.cumsum(np.where(errors, self.llr_error, self.llr_correct))
            g = total - np.minimum(np.minimum.accumulate(total), -self.statistic)
            crossed = np.flatnonzero(g >= self.threshold)
            end = int(crossed[0]) + 1 if crossed.size else errors.size
            chunk, g = errors[:end], g[:end]
            zero = np.flatnonzero(g <= 0.0)
            if zero.size:  # the onset estimate: the last label after which the statistic stood at 0
                last = int(zero[-1])
                self._run_labels, self._run_errors = end - 1 - last, int(chunk[last + 1:].sum())
                self._run_start_s = now_s if self._run_labels else None
            else:
                self._run_start_s = now_s if self._run_labels == 0 else self._run_start_s
                self._run_labels += end
                self._run_errors += int(chunk.sum())
            self._seen += end
            self.statistic = float(g[-1])
            if crossed.size:
                events += self._crossing(now_s)
            errors = errors[end:]
        if self.state == "alarm" and self._seen - self._last_crossing_at >= self.config.clear_after_labels:
            events.append(self._event("ok", now_s, self.statistic, self._seen - self._alarm_at,
                                      {"alarm_since": self.since, "alarm_labels": self._seen - self._alarm_at}))
            self.state, self.since = "ok", now_s
        return events

    def retire(self, now_s: float, why: str) -> list[dict]:
        """Clear the alarm of a version that no longer gets traffic (a newer one took over)."""
        if self.state != "alarm":
            return []
        event = self._event("ok", now_s, self.statistic, self._seen - self._alarm_at,
                            {"alarm_since": self.since, "alarm_labels": self._seen - self._alarm_at, "why": why})
        self.state, self.since = "ok", now_s
        return [event]

    def _crossing(self, now_s: float) -> list[dict]:
        value, labels = self.statistic, self._run_labels
        evidence = {"labels_since_onset": labels, "errors_since_onset": self._run_errors,
                    "error_rate_since_onset": json_number(self._run_errors / labels) if labels else None,
                    "onset_s": json_number(self._run_start_s), "label_index": self._label_index()}
        self.statistic, self._last_crossing_at = 0.0, self._seen
        self.crossings += 1
        self._run_labels, self._run_errors, self._run_start_s = 0, 0, None
        if self.state == "alarm":
            return []
        self.state, self.since, self.alarm_count, self._alarm_at = "alarm", now_s, self.alarm_count + 1, self._seen
        return [self._event("alarm", now_s, value, labels, evidence)]

    def _label_index(self) -> int:
        """How many labels (burn-in included) had been added when the CUSUM got where it is."""
        return self._seen + (self.config.burn_in if self._burn_n else 0)

    def _event(self, state: str, now_s: float, value: float, rows: int, evidence: dict) -> dict:
        return {"stream": "label_error", "state": state, "detector": "bernoulli_cusum", "statistic": "llr",
                "value": json_number(value), "threshold": self.threshold, "since": json_number(now_s),
                "rows": int(rows), "evidence": {**evidence, **self._rates()}}

    def _remember(self, errors: np.ndarray) -> None:
        size = self._recent.size
        tail = errors[-size:]
        idx = (self._recent_pos + np.arange(tail.size)) % size
        self._recent[idx] = tail
        self._recent_pos = int((self._recent_pos + tail.size) % size)
        self._recent_n = min(self._recent_n + tail.size, size)

    def _rates(self) -> dict:
        recent = self._recent[:self._recent_n] if self._recent_n < self._recent.size else self._recent
        return {"baseline_rate": json_number(self.baseline_rate), "baseline_rows": self.baseline_rows,
                "p0": json_number(self.p0), "p1": json_number(self.p1),
                "recent_error_rate": json_number(recent.mean()) if self._recent_n else None,
                "recent_labels": int(self._recent_n)}

    def report(self, now_s: float) -> dict:
        """JSON-able state: alarm state, the CUSUM against h, baseline, recent and total error rates."""
        return {"stream": "label_error", "state": self.state, "since": json_number(self.since),
                "alarms": self.alarm_count, "crossings": self.crossings, "labels": self.labels,
                "error_rate": json_number(self.errors / self.labels) if self.labels else None,
                "burn_in_left": max(self.config.burn_in - self._burn_n, 0) if self.baseline_rate is None else 0,
                "cusum": {"value": json_number(self.statistic), "threshold": self.threshold,
                          "labels_since_onset": self._run_labels},
                **self._rates()}
