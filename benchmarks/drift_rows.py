"""Row-stream drift trials: seeded onsets in replayed fraud traffic, stable replay, the fixed-PSI anchor, cost.

Every trial runs the real `VersionDrift` over steps of `STEP_ROWS` rows binned by
`FraudWorld.step_counts` (the server's binning), one step per second of simulated time:
- `onset_trials`: stable steps from the pool, then from a random row on, rows from a drifted
  generator (a mean shift of one feature, or the correlation-only scenario); the delay is the
  rows from the onset to the end of the step whose event put the watched stream in "alarm".
- `stable_replay`: the whole stable pool through one detector; every alarm is false.
- `fixed_psi_anchor`: Evidently's default rule (PSI >= 0.1, empty shares floored at 1e-4) on
  batch windows of the same bins, on stable and shifted windows.
- `step_cost`: microseconds per `VersionDrift.add` of S streams.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from benchmarks.drift_world import STEP_ROWS, FraudWorld, StablePool
from serving.monitoring.drift import DriftConfig, VersionDrift
from training.datasets import FRAUD_FEATURES, make_fraud

__all__ = ["onset_trials", "shifted_rows", "correlation_rows", "stable_replay", "fixed_psi_anchor", "step_cost",
           "page_hinkley_anchor", "delay_summary"]

_CHUNK_ROWS = 10_000  # post-onset rows generated at a time


def shifted_rows(world: FraudWorld, feature: str, shift_sd: float) -> Callable[[int, int], np.ndarray]:
    """A generator of baseline rows with `feature` moved by shift_sd of its training std."""
    col = FRAUD_FEATURES.index(feature)
    delta = np.float32(shift_sd * world.std[col])

    def rows(n: int, seed: int) -> np.ndarray:
        x, _ = make_fraud(n, seed=seed)
        x[:, col] += delta
        return x
    return rows


def correlation_rows(n: int, seed: int) -> np.ndarray:
    return make_fraud(n, seed=seed, scenario="correlation_shift")[0]


def delay_summary(delays: list[float | None], goal_rows: float | None = None) -> dict:
    """Median, p90, p99, max of delays (None = not flagged within the horizon, counted as beyond it),
    and the share within goal_rows with its Clopper-Pearson 95 % interval."""
    from scipy.stats import beta

    n = len(delays)
    flagged = np.array([d for d in delays if d is not None], dtype=np.float64)
    missed = n - flagged.size
    full = np.concatenate([flagged, np.full(missed, np.inf)])

    def pct(q: float):
        v = float(np.quantile(full, q, method="higher")) if n else None
        return None if v is None or not np.isfinite(v) else v
    out = {"trials": n, "flagged": int(flagged.size), "missed": int(missed), "median": pct(0.5), "p90": pct(0.9),
           "p99": pct(0.99), "max": None if missed or not n else float(flagged.max()),
           "mean": float(flagged.mean()) if flagged.size else None}
    if goal_rows is not None and n:
        k = int(np.sum(full <= goal_rows))
        lo = float(beta.ppf(0.025, k, n - k + 1)) if k > 0 else 0.0
        hi = float(beta.ppf(0.975, k + 1, n - k)) if k < n else 1.0
        out["within_goal"] = {"goal_rows": goal_rows, "share": k / n, "ci95": [lo, hi], "count": k}
    return out


def onset_trials(world: FraudWorld, pool: StablePool, make_rows: Callable[[int, int], np.ndarray], *,
                 watch: list[str], trials: int, seed: int, config: DriftConfig = DriftConfig(),
                 horizon_rows: int = 60_000, onset_range: tuple[int, int] = (20_000, 80_000),
                 run_to_horizon: bool = False) -> dict:
    """Seeded onsets: per trial a fresh detector, stable pool steps up to a random onset row, then
    `make_rows` traffic until a `watch`ed stream alarms (or `horizon_rows` after the onset; with
    `run_to_horizon`, always to the horizon, counting every stream's alarms after the onset)."""
    watch_idx = {world.names.index(w) for w in watch}
    delays, false_alarms, after_onset = [], 0, np.zeros(world.streams, np.int64)
    detectors: dict[str, int] = {}
    for t in range(trials):
        rng = np.random.default_rng([seed, t])
        vd = VersionDrift(world.references, config)
        onset = int(rng.integers(*onset_range))
        pre_steps, partial = divmod(onset, STEP_ROWS)
        start = int(rng.integers(0, len(pool.counts) - pre_steps))
        clock = 0.0
        for k in range(pre_steps):
            false_alarms += sum(e["state"] == "alarm" for e in vd.add(pool.counts[start + k], STEP_ROWS, clock))
            clock += 1.0
        rows_fed, delay = pre_steps * STEP_ROWS, None
        fresh = make_fraud(partial, seed=seed * 100_003 + t)[0] if partial else np.zeros((0, len(FRAUD_FEATURES)),
                                                                                        np.float32)
        chunk = 0
        while rows_fed - onset < horizon_rows and (delay is None or run_to_horizon):
            drifted = make_rows(_CHUNK_ROWS, seed * 1_000_003 + t * 1_000 + chunk)
            chunk += 1
            counts = world.step_counts(np.concatenate([fresh, drifted]) if fresh.size else drifted)
            fresh = np.zeros((0, len(FRAUD_FEATURES)), np.float32)
            for step in counts:
                rows_fed += STEP_ROWS
                for event in vd.add(step, STEP_ROWS, clock):
                    if event["state"] != "alarm":
                        continue
                    i = world.names.index(event["stream"])
                    after_onset[i] += 1
                    if i in watch_idx and delay is None:
                        delay = rows_fed - onset
                        detectors[event["detector"]] = detectors.get(event["detector"], 0) + 1
                clock += 1.0
                if rows_fed - onset >= horizon_rows or (delay is not None and not run_to_horizon):
                    break
        delays.append(delay)
    return {"delays": delays, "false_alarms_before_onset": int(false_alarms), "first_detector": detectors,
            "alarms_after_onset": {n: int(c) for n, c in zip(world.names, after_onset) if c},
            "trials": trials, "horizon_rows": horizon_rows, "onset_range": list(onset_range)}


def stable_replay(world: FraudWorld, pool: StablePool, config: DriftConfig = DriftConfig()) -> dict:
    """The whole stable pool through one detector, in order: every alarm is a false alarm."""
    vd = VersionDrift(world.references, config)
    alarms: list[dict] = []
    started = time.perf_counter()
    for k, step in enumerate(pool.counts):
        alarms += [e for e in vd.add(step, STEP_ROWS, float(k)) if e["state"] == "alarm"]
    elapsed = time.perf_counter() - started
    return {"rows": pool.rows, "steps": int(len(pool.counts)), "alarms": len(alarms),
            "alarm_streams": sorted({a["stream"] for a in alarms}),
            "alarm_details": [{k: a[k] for k in ("stream", "detector", "statistic", "value", "threshold")}
                              for a in alarms[:20]],
            "us_per_step": elapsed / len(pool.counts) * 1e6}


def _fold(counts: np.ndarray) -> np.ndarray:
    out = counts[..., 1:-1].astype(np.int64)
    out[..., 0] += counts[..., 0]
    out[..., -1] += counts[..., -1]
    return out


def _evidently_psi(window: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSI as Evidently's psi stattest computes it on given bins: shares, zeros floored at 1e-4."""
    a = window / window.sum(axis=-1, keepdims=True)
    e = reference / reference.sum(axis=-1, keepdims=True)
    a, e = np.where(a == 0, 1e-4, a), np.where(e == 0, 1e-4, e)
    return np.sum((e - a) * np.log(e / a), axis=-1)


def fixed_psi_anchor(world: FraudWorld, pool: StablePool, *, feature: str = "V3", shifts=(0.1, 0.3),
                     window_rows=(1_000, 5_000, 10_000, 50_000), shifted_windows: int = 100, seed: int = 7) -> dict:
    """A fixed PSI >= 0.1 rule on non-overlapping windows: false alarms on stable windows of several sizes
    (all 32 streams), and per-window power on shifted windows of 10,000 rows of `feature`."""
    folded = _fold(pool.counts)
    ref = np.stack([np.asarray(r.counts, np.int64) for r in world.references])
    stable = {}
    for size in window_rows:
        k = size // STEP_ROWS
        n = len(folded) // k
        windows = folded[:n * k].reshape(n, k, *folded.shape[1:]).sum(axis=1)
        psi = _evidently_psi(windows, ref[None])
        stable[str(size)] = {"windows": int(n), "streams": int(ref.shape[0]), "alarms": int(np.sum(psi >= 0.1)),
                             "alarm_share_per_stream_window": float(np.mean(psi >= 0.1)),
                             "windows_with_any_alarm": float(np.mean((psi >= 0.1).any(axis=1)))}
    col = world.names.index(feature)
    shifted = {}
    for shift in shifts:
        make = shifted_rows(world, feature, shift)
        psis = []
        for w in range(shifted_windows):
            counts = _fold(world.step_counts(make(10_000, seed * 7_919 + w)))[:, col].sum(axis=0)
            psis.append(float(_evidently_psi(counts, ref[col])))
        power = float(np.mean(np.array(psis) >= 0.1))
        shifted[f"{shift:g}"] = {"windows": shifted_windows, "window_rows": 10_000, "power": power,
                                 "median_psi": float(np.median(psis)),
                                 # a batch rule flags at the end of the first batch over 0.1: an onset lands
                                 # half a batch before its end on average, then 1 / power batches
                                 "expected_delay_rows": (5_000 + 10_000 * (1 / power - 1)) if power > 0 else None}
    return {"rule": "PSI >= 0.1 (Evidently's default threshold), empty shares floored at 1e-4, the fleet bins",
            "stable": stable, "shifted": shifted, "feature": feature}


def page_hinkley_anchor(pool: StablePool, rows: int = 1_000_000) -> dict:
    """river's PageHinkley at its defaults on the raw values of stable V3: detections per 1M rows."""
    from river.drift import PageHinkley

    values = pool.v3[:rows].astype(np.float64).tolist()
    ph, hits = PageHinkley(), 0
    for v in values:
        ph.update(v)
        hits += ph.drift_detected
    return {"detector": "river.drift.PageHinkley()", "stream": "V3 raw values, stable", "rows": len(values),
            "detections": int(hits), "per_million_rows": hits / len(values) * 1e6}


def step_cost(world: FraudWorld, pool: StablePool, *, steps: int = 3_000, repeats: int = 7) -> dict:
    """Median microseconds per `VersionDrift.add` (S streams, warm detector), over `repeats` samples."""
    counts = [np.ascontiguousarray(c, np.int64) for c in pool.counts[:steps + 600]]
    vd = VersionDrift(world.references)
    for k in range(600):  # warm-up: fill both windows
        vd.add(counts[k], STEP_ROWS, float(k))
    samples, clock = [], 600.0
    for r in range(repeats):
        started = time.perf_counter()
        for k in range(600, 600 + steps):
            vd.add(counts[k], STEP_ROWS, clock)
            clock += 1.0
        samples.append((time.perf_counter() - started) / steps * 1e6)
    med = statistics.median(samples)
    return {"streams": world.streams, "bins": world.bins, "median_us_per_step": med, "min_us": min(samples),
            "samples_us": [round(s, 2) for s in samples],
            "core_share_at_1_step_per_s": med / 1e6, "steps_per_s_per_core": 1e6 / med}
