"""Has the model stopped telling the classes apart? A sequential test on the ranks of labelled scores.

The label-error detector counts mistakes at one threshold. For a rare positive class (fraud is
1 %) a model that stops recognising positives is wrong about as often as before: its errors were
already mostly missed positives. Its ranking, though, collapses: positives no longer score above
negatives (the ROC AUC falls toward 0.5). This detector watches that, per binary classifier
version, on the labelled predictions the monitor joins:

- reference: the version's held-out scores of each class in that class's own quantile bins
  (metadata `monitoring.scores_by_label`, written at training; a live score outside a class's
  edges counts in its end bin);
- each labelled prediction scores the ridit of its bin within its class's reference histogram,
  and `detectors.RiditCusum` runs a two-sided CUSUM per class (Bennett's bound, the reference's
  sampling error as margins: calibrated without a normal approximation; `serving.monitoring.drift`'s
  module doc has the formulas); an alarm is a positive-class CUSUM crossing downwards (positives
  score lower than they did) or a negative-class one crossing upwards (negatives score higher);
- h = ln(4 F) for F = `false_alarm_labels` (four CUSUMs share the budget), so at most one false
  alarm per F labels whatever the design; the design shift is 1.5 ridit standard deviations: the
  collapse it is for is large (positives falling to the negatives' scores move their mean ridit
  from 1/2 to near 0, 1.7 sd), and the reference's few positives need wide margins.
  In `tests/unit/test_rank.py`: no false alarm in 2 M stable labels at 1 % positives, and a
  collapse flagged within 8,000 labels (about 80 positives).
"""

from __future__ import annotations

import math

import numpy as np

from serving.monitoring.detectors import RiditCusum, json_number

__all__ = ["RankDetector"]

_DESIGN_SHIFT_SD = 1.5
_MARGIN_SD = 3.0


class RankDetector:
    """Two CUSUMs per class on the ridits of labelled scores (see the module doc)."""

    def __init__(self, by_label: dict, *, false_alarm_labels: float = 1e8, clear_after_labels: int = 5_000):
        self.edges = [np.asarray(by_label[c]["edges"], np.float64) for c in ("0", "1")]
        counts = [np.asarray(by_label[c]["counts"], np.int64) for c in ("0", "1")]
        if any(len(c) != len(e) - 1 or c.sum() <= 0 for c, e in zip(counts, self.edges)):
            raise ValueError("scores_by_label needs each class's edges and its non-empty histogram over them")
        width = max(len(c) for c in counts)
        reference = np.zeros((2, width), np.int64)
        mask = np.zeros((2, width), bool)
        for i, c in enumerate(counts):
            reference[i, :len(c)] = c
            mask[i, :len(c)] = True
        self.reference_rows = reference.sum(axis=1).tolist()
        self.cusum = RiditCusum(reference, mask, threshold=math.log(4 * false_alarm_labels),
                                design_shift_sd=_DESIGN_SHIFT_SD, reference_margin_sd=_MARGIN_SD,
                                variance_margin_sd=_MARGIN_SD)
        self.clear_after_labels = clear_after_labels
        self.state, self.since, self.alarms = "ok", None, 0
        self.labels = 0
        self._last_crossing = 0

    def _counts(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        out = np.zeros(self.cusum.u.shape, np.int64)
        for cls, edges in enumerate(self.edges):
            bins = len(edges) - 1
            index = np.clip(np.searchsorted(edges, scores[labels == cls], side="right") - 1, 0, bins - 1)
            out[cls, :bins] = np.bincount(index, minlength=bins)
        return out

    def add(self, scores: np.ndarray, labels: np.ndarray, now_s: float) -> list[dict]:
        """Labelled predictions (score [n], label 0/1 [n]); returns the state changes."""
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        if not len(labels):
            return []
        up, down = self.cusum.update(self._counts(scores, labels), now_s)
        self.labels += len(labels)
        crossed = bool(up[0] or down[1])  # negatives scoring higher, positives lower
        events = []
        if crossed:
            self._last_crossing = self.labels
            if self.state == "ok":
                self.state, self.since, self.alarms = "alarm", now_s, self.alarms + 1
                side = "positives lower" if down[1] else "negatives higher"
                value = self.cusum.last_down[1] if down[1] else self.cusum.last_up[0]
                events.append(self._event("alarm", now_s, value, {"which": side, **self._evidence()}))
        elif self.state == "alarm" and self.labels - self._last_crossing >= self.clear_after_labels:
            self.state, self.since = "ok", now_s
            events.append(self._event("ok", now_s, None, self._evidence()))
        return events

    def retire(self, now_s: float, why: str) -> list[dict]:
        if self.state != "alarm":
            return []
        self.state, self.since = "ok", now_s
        return [self._event("ok", now_s, None, {"why": why})]

    def _evidence(self) -> dict:
        c = self.cusum
        return {"positives_down": json_number(c.last_down[1]), "negatives_up": json_number(c.last_up[0]),
                "reference_rows": {"negative": self.reference_rows[0], "positive": self.reference_rows[1]}}

    def _event(self, state: str, now_s: float, value, evidence: dict) -> dict:
        return {"stream": "label_rank", "state": state, "detector": "rank_cusum", "statistic": "ridit",
                "value": json_number(value), "threshold": self.cusum.threshold, "since": json_number(now_s),
                "rows": self.labels, "evidence": evidence}

    def report(self, now_s: float) -> dict:
        return {"stream": "label_rank", "state": self.state, "since": json_number(self.since), "alarms": self.alarms,
                "labels": self.labels, "threshold": self.cusum.threshold,
                "positives_down": json_number(self.cusum.down[1]), "negatives_up": json_number(self.cusum.up[0])}
