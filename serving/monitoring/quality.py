"""Online quality of one model version: its labelled predictions, in windows, and what they score.

The monitor feeds each version the predictions its labels joined (`add`, prediction-time order
within a batch); `report` gives, over the latest `window_labels` labelled predictions ("rows")
and over those made in the last `window_s` seconds ("time"):

- `accuracy` and `label_error_rate` (1 - accuracy): a binary classifier's score >= `threshold`
  (the version's reference threshold, 0.5) against its 0/1 label, a multi-class one's argmax;
- `roc_auc`: `sklearn.metrics.roc_auc_score` on exactly those rows (binary: the score; several
  classes: one-vs-rest, macro), None while one class is missing;
- `calibration_error`: the expected calibration error, |mean confidence - accuracy| weighted over
  10 equal-width confidence bins (binary: the score against the positive rate per bin), and `brier`;
- for a regression: `mae` and `rmse`.
Memory is bounded: at most `max_rows` labelled predictions are kept per version.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["QualityWindow", "quality_metrics"]

_ECE_BINS = 10


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def quality_metrics(task: str, outputs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """The metrics of labelled predictions: `outputs` [n] (binary, regression) or [n, k] (classes)."""
    n = int(len(labels))
    doc: dict = {"rows": n}
    if n == 0:
        return doc
    if task == "regression":
        err = np.asarray(outputs, np.float64).reshape(n) - labels.astype(np.float64)
        doc.update(mae=_finite(np.mean(np.abs(err))), rmse=_finite(np.sqrt(np.mean(err**2))))
        return doc
    from sklearn.metrics import roc_auc_score

    labels = labels.astype(np.int64)
    if task == "binary":
        score = np.asarray(outputs, np.float64).reshape(n)
        predicted = (score >= threshold).astype(np.int64)
        confidence = score  # calibration of P(positive) against the positive rate
        truth = labels.astype(np.float64)
        auc = float(roc_auc_score(labels, score)) if 0 < labels.sum() < n else None
        doc["brier"] = _finite(np.mean((score - truth) ** 2))
        doc["positive_rate"] = float(labels.mean())
    else:
        probs = np.asarray(outputs, np.float64).reshape(n, -1)
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        truth = (predicted == labels).astype(np.float64)
        auc = None
        present = np.unique(labels)
        if present.size == probs.shape[1]:
            auc = float(roc_auc_score(labels, probs / probs.sum(axis=1, keepdims=True), multi_class="ovr"))
    accuracy = float(np.mean(predicted == labels))
    bins = np.minimum((np.clip(confidence, 0.0, 1.0) * _ECE_BINS).astype(np.int64), _ECE_BINS - 1)
    weight = np.bincount(bins, minlength=_ECE_BINS)
    gap = np.abs(np.bincount(bins, confidence, _ECE_BINS) - np.bincount(bins, truth, _ECE_BINS))
    doc.update(accuracy=accuracy, label_error_rate=1.0 - accuracy, roc_auc=_finite(auc),
               calibration_error=float(gap.sum() / n) if weight.sum() else None)
    return doc


@dataclass
class _Chunk:
    predicted_us: np.ndarray  # int64: when each prediction was made
    outputs: np.ndarray
    labels: np.ndarray


class QualityWindow:
    """The labelled predictions of one version and their metrics over a rows window and a time window."""

    def __init__(self, task: str, *, window_labels: int = 10_000, window_s: float = 3600.0,
                 max_rows: int = 200_000, threshold: float = 0.5):
        self.task = task
        self.window_labels = window_labels
        self.window_s = window_s
        self.max_rows = max(max_rows, window_labels)
        self.threshold = threshold
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._rows = 0
        self.labelled_total = 0  # since the monitor started
        self._cached: tuple[int, int, dict] | None = None  # (labelled_total, second, report): scrapes reuse it

    def add(self, predicted_us: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> None:
        n = len(labels)
        if n == 0:
            return
        self._chunks.append(_Chunk(np.asarray(predicted_us, np.int64), np.asarray(outputs), np.asarray(labels)))
        self._rows += n
        self.labelled_total += n
        while self._chunks and self._rows - len(self._chunks[0].labels) >= self.max_rows:
            self._rows -= len(self._chunks.popleft().labels)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._chunks:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
        return (np.concatenate([c.predicted_us for c in self._chunks]),
                np.concatenate([c.outputs for c in self._chunks]), np.concatenate([c.labels for c in self._chunks]))

    def report(self, now_s: float) -> dict:
        """{"rows": metrics of the latest window_labels, "time": of the last window_s seconds, "labelled": total}.

        Computed at most once a second while no label arrives (a scrape of /metrics and /quality reuse it).
        """
        key = (self.labelled_total, int(now_s))
        if self._cached is not None and self._cached[:2] == key:
            return self._cached[2]
        stamps, outputs, labels = self._arrays()
        latest = slice(max(0, len(labels) - self.window_labels), len(labels))
        recent = stamps >= int((now_s - self.window_s) * 1e6)
        rows_doc = quality_metrics(self.task, outputs[latest], labels[latest], self.threshold)
        time_doc = quality_metrics(self.task, outputs[recent], labels[recent], self.threshold)
        rows_doc["window"] = f"the latest {self.window_labels} labelled predictions"
        time_doc["window"] = f"predictions of the last {self.window_s:g} s"
        report = {"rows": rows_doc, "time": time_doc, "labelled": self.labelled_total}
        self._cached = (*key, report)
        return report
