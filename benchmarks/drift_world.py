"""The fraud version the drift trials watch, and its live traffic binned as the server bins it.

`FraudWorld` builds what `make serve` publishes for fraud, on the same data: `make_fraud(40_000,
seed=0)`, the first 80 % for training, `reference_stats(x_train, FRAUD_FEATURES)` for the 30
feature references, and `monitoring_reference` for the score and PCA references (PCA fitted on
the standardized training rows, histograms on the 8,000 held-out rows). The score comes from a
real FraudMLP trained by `fit_fraud` for `epochs` epochs (3 by default, ~2 s; `make serve`
trains 10, so its scores are a little sharper: the stream is the same kind, a model's
probability in quantile bins), served as the server serves it (`for_serving()` fed the
standardized, clipped rows).

`step_counts(x)` bins live rows exactly as the server does: `native.histogram` on each step's
rows, against the reference edges as float32, with an underflow and an overflow bin, for the
features, the score and the PCA error: int16 [steps, 32, 22] (a step of 500 rows fits int16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import native
from serving.monitoring.drift import StreamReference
from serving.monitoring.reference import monitoring_reference, pca_arrays, reconstruction_error
from training.bootstrap import FRAUD_CLIP, TrainParams, fit_fraud, reference_stats, split_holdout
from training.datasets import FRAUD_FEATURES, make_fraud
from training.preprocess_reference import standardize

__all__ = ["FraudWorld", "StablePool", "STEP_ROWS"]

STEP_ROWS = 500  # rows a version serves per monitor step (500 rows/s at one step a second)


class FraudWorld:
    """The fraud version's references and the server's binning of live rows (module doc)."""

    def __init__(self, *, seed: int = 0, rows: int = 40_000, epochs: int = 3, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        x, y = make_fraud(rows, seed=seed)
        x_train, y_train, x_hold, y_hold = split_holdout(x, y, 0.2)
        self.stats = reference_stats(x_train, FRAUD_FEATURES)
        self.metadata = {"feature_names": list(FRAUD_FEATURES), "reference_stats": self.stats}
        self.model = fit_fraud(x_train, y_train, TrainParams(epochs=epochs), seed=seed).for_serving()
        self.monitoring = monitoring_reference(
            z_train=standardize(x_train, self.metadata, FRAUD_CLIP),
            z_holdout=standardize(x_hold, self.metadata, FRAUD_CLIP),
            outputs_holdout=self.scores(x_hold), labels_holdout=y_hold, output_name="probability")
        self.pca_mean, self.pca_components = pca_arrays(self.monitoring["pca"])
        self.feature_edges = np.array([self.stats[f]["edges"] for f in FRAUD_FEATURES], np.float32)
        self.score_edges = np.array([self.monitoring["scores"]["edges"]], np.float32)
        self.pca_edges = np.array([self.monitoring["pca"]["edges"]], np.float32)
        bins = {self.feature_edges.shape[1] - 1, self.score_edges.shape[1] - 1, self.pca_edges.shape[1] - 1}
        if len(bins) != 1:  # quantile edges merge ties; the trials feed one [S, b + 2] array
            raise RuntimeError(f"the streams' bin counts differ ({sorted(bins)}); expected 20 each")
        self.bins = bins.pop()
        self.references = [StreamReference(f, "feature", np.asarray(self.stats[f]["counts"], np.int64),
                                           np.asarray(self.stats[f]["edges"])) for f in FRAUD_FEATURES]
        self.references.append(StreamReference("score", "score", np.asarray(self.monitoring["scores"]["counts"]),
                                               np.asarray(self.monitoring["scores"]["edges"])))
        self.references.append(StreamReference("pca", "pca", np.asarray(self.monitoring["pca"]["counts"]),
                                               np.asarray(self.monitoring["pca"]["edges"])))
        self.names = [r.name for r in self.references]
        self.std = np.array([self.stats[f]["std"] for f in FRAUD_FEATURES])
        self.train_rows, self.holdout_rows = len(x_train), len(x_hold)

    @property
    def streams(self) -> int:
        return len(self.references)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The served model's P(fraud) of raw rows x, float32 [n]."""
        import torch

        with torch.inference_mode():
            z = torch.from_numpy(standardize(x, self.metadata, FRAUD_CLIP))
            return self.model(z).numpy().reshape(-1)

    def step_counts(self, x: np.ndarray, step_rows: int = STEP_ROWS) -> np.ndarray:
        """int16 [len(x) // step_rows, S, b + 2]: each step's live histograms, binned as the server bins them."""
        steps = len(x) // step_rows
        x = np.ascontiguousarray(x[:steps * step_rows], np.float32)
        score = self.scores(x).reshape(-1, 1)
        err = reconstruction_error(standardize(x, self.metadata, FRAUD_CLIP), self.pca_mean, self.pca_components)
        err = np.ascontiguousarray(err, np.float32).reshape(-1, 1)
        out = np.zeros((steps, self.streams, self.bins + 2), np.int16)
        features = np.zeros((x.shape[1], self.bins + 2), np.int64)
        one = np.zeros((1, self.bins + 2), np.int64)
        d = x.shape[1]
        for k in range(steps):
            rows = slice(k * step_rows, (k + 1) * step_rows)
            features[:] = 0
            native.histogram(x[rows], self.feature_edges, features)
            out[k, :d] = features
            one[:] = 0
            native.histogram(score[rows], self.score_edges, one)
            out[k, d] = one[0]
            one[:] = 0
            native.histogram(err[rows], self.pca_edges, one)
            out[k, d + 1] = one[0]
        return out

    def true_probabilities(self, counts: np.ndarray) -> np.ndarray:
        """float64 [S, b]: folded bin shares of many steps' counts [steps, S, b + 2] (the calibration's truth)."""
        total = counts.sum(axis=0, dtype=np.int64)
        folded = total[:, 1:-1].astype(np.float64)
        folded[:, 0] += total[:, 0]
        folded[:, -1] += total[:, -1]
        return folded / folded.sum(axis=1, keepdims=True)


@dataclass
class StablePool:
    """Stable traffic binned in steps: `counts` int16 [steps, S, b + 2]; `v3` the raw V3 of its first rows."""

    counts: np.ndarray
    v3: np.ndarray
    rows: int
    seconds: float

    @classmethod
    def build(cls, world: FraudWorld, rows: int, *, seed: int = 1_000, chunk: int = 200_000,
              keep_v3: int = 1_000_000) -> "StablePool":
        import time

        started = time.perf_counter()
        parts, v3 = [], []
        col = FRAUD_FEATURES.index("V3")
        for i, start in enumerate(range(0, rows, chunk)):
            x, _ = make_fraud(min(chunk, rows - start), seed=seed + i)
            parts.append(world.step_counts(x))
            if start < keep_v3:
                v3.append(x[:keep_v3 - start, col].copy())
        counts = np.concatenate(parts)
        return cls(counts, np.concatenate(v3), int(counts.shape[0] * STEP_ROWS), time.perf_counter() - started)
