"""Label-error trials: fleet's Bernoulli CUSUM against river's ADWIN, DDM and PageHinkley on the same streams.

Streams are Bernoulli errors (True = a wrong prediction), fed in chunks of `CHUNK_LABELS` as
the monitor joins labels:
- `label_onsets`: per trial a baseline measured on `baseline_rows` held-out labels (or, with
  `burn_in`, none: the detector estimates it), stable labels at p0 up to a random onset, then p1;
  the delay is the labels from the onset to the crossing (the event's `label_index`).
- `label_stable`: long stable streams with a fresh baseline each: every alarm is false.
- `river_detectors`: the same seeded streams through river's detectors at their defaults.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.drift_calibration import poisson_upper
from serving.monitoring.detectors import LabelConfig, LabelErrorDetector

__all__ = ["CHUNK_LABELS", "label_onsets", "label_stable", "river_onsets", "river_stable"]

CHUNK_LABELS = 100


def _stream(rng: np.random.Generator, onset: int, horizon: int, p0: float, p1: float) -> np.ndarray:
    return np.concatenate([rng.random(onset) < p0, rng.random(horizon) < p1])


def _trial_setup(seed: int, t: int, p0: float, baseline_rows: int, onset_range: tuple[int, int]):
    rng = np.random.default_rng([seed, t])
    baseline = rng.binomial(baseline_rows, p0) / baseline_rows
    onset = int(rng.integers(*onset_range))
    return rng, baseline, onset


def label_onsets(*, trials: int, seed: int, p0: float = 0.05, p1: float = 0.10, baseline_rows: int = 8_000,
                 config: LabelConfig = LabelConfig(), burn_in: bool = False, horizon: int = 20_000,
                 onset_range: tuple[int, int] = (2_000, 20_000)) -> dict:
    """Delays (labels after the onset) of fleet's detector; alarms before the onset are false."""
    delays, false_alarms = [], 0
    for t in range(trials):
        rng, baseline, onset = _trial_setup(seed, t, p0, baseline_rows, onset_range)
        errors = _stream(rng, onset, horizon, p0, p1)
        det = LabelErrorDetector(None if burn_in else baseline, baseline_rows, config)
        delay = None
        for first in range(0, errors.size, CHUNK_LABELS):
            for event in det.add(errors[first:first + CHUNK_LABELS], float(first)):
                if event["state"] != "alarm":
                    continue
                at = event["evidence"]["label_index"]
                if at <= onset:
                    false_alarms += 1
                elif delay is None:
                    delay = at - onset
            if delay is not None:
                break
        delays.append(delay)
    return {"delays": delays, "false_alarms_before_onset": false_alarms, "trials": trials,
            "burn_in": config.burn_in if burn_in else None, "horizon_labels": horizon}


def label_stable(*, trials: int, labels: int, seed: int, p0: float = 0.05, baseline_rows: int = 8_000,
                 config: LabelConfig = LabelConfig(), chunk: int = 100_000) -> dict:
    """`trials` stable streams of `labels` labels at p0 with a fresh baseline each: false alarms per 1M labels."""
    alarms, started = 0, time.perf_counter()
    for t in range(trials):
        rng = np.random.default_rng([seed, t, 1])
        baseline = rng.binomial(baseline_rows, p0) / baseline_rows
        det = LabelErrorDetector(baseline, baseline_rows, config)
        for first in range(0, labels, chunk):
            errors = rng.random(min(chunk, labels - first)) < p0
            det.add(errors, float(first))
        alarms += det.crossings  # every crossing, also those that only renew an alarm
    total = trials * labels
    return {"trials": trials, "labels_per_trial": labels, "labels": total, "alarms": alarms,
            "per_million_labels": alarms / total * 1e6, "upper95_per_million": poisson_upper(alarms) / total * 1e6,
            "target_per_million": 1e6 / config.false_alarm_labels, "seconds": time.perf_counter() - started}


def _river(name: str):
    from river import drift

    return {"ADWIN": drift.ADWIN, "DDM": drift.binary.DDM, "PageHinkley": drift.PageHinkley}[name]()


def river_onsets(name: str, *, trials: int, seed: int, p0: float = 0.05, p1: float = 0.10,
                 baseline_rows: int = 8_000, horizon: int = 20_000,
                 onset_range: tuple[int, int] = (2_000, 20_000)) -> dict:
    """The same seeded onset streams as `label_onsets` through river's `name` at its defaults."""
    delays, false_alarms = [], 0
    for t in range(trials):
        rng, _, onset = _trial_setup(seed, t, p0, baseline_rows, onset_range)
        errors = _stream(rng, onset, horizon, p0, p1)
        det, delay = _river(name), None
        for i, x in enumerate(errors.tolist()):
            det.update(x)
            if det.drift_detected:
                if i < onset:
                    false_alarms += 1
                else:
                    delay = i + 1 - onset
                    break
        delays.append(delay)
    return {"detector": f"river.drift.{name}()", "delays": delays, "false_alarms_before_onset": false_alarms}


def river_stable(name: str, *, trials: int, labels: int, seed: int, p0: float = 0.05) -> dict:
    """river's `name` on stable streams: detections per 1M labels."""
    hits = 0
    for t in range(trials):
        rng = np.random.default_rng([seed, t, 1])
        det = _river(name)
        for x in (rng.random(labels) < p0).tolist():
            det.update(x)
            hits += det.drift_detected
    total = trials * labels
    return {"detector": f"river.drift.{name}()", "labels": total, "alarms": hits,
            "per_million_labels": hits / total * 1e6}
