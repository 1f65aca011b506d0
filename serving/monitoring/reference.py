"""A version's monitoring reference: what its live traffic is compared with, fixed when it is trained.

Stored in the version's metadata.json under `"monitoring"` (written by the training code,
read by the ingress replicas and the monitor):

    "monitoring": {
      "scores":      {"edges": [b + 1 floats], "counts": [b ints], "rows": m, "output": "<output name>"},
      "scores_by_label": {"0": {"edges", "counts", "rows"}, "1": {...}}   (a binary classifier: each class's
                     held-out scores in its own quantile bins)
      "pca":         {"mean": [d], "components": [[d] * k], "variance": 0.9, "explained": 0.91,
                      "edges": [b + 1], "counts": [b], "rows": m},
      "label_error": {"rate": 0.012, "rows": 7995, "threshold": 0.5}
    }

- `scores`: the histogram of the model's output score on held-out rows (quantile bins: each
  holds about 1/b of the reference, so every bin is well populated). The score of a row is its
  first output's value for a one-value output (a probability), else the largest value (the
  predicted class's probability): `row_scores`.
- `pca`: a PCA of the standardized training rows (the model's own input), keeping the leading
  components that explain `variance` of it; a row's reconstruction error is the squared norm of
  what those components leave out (`reconstruction_error`). Its histogram on held-out rows is the
  reference. A change of correlations with every marginal unchanged moves it (NannyML's check).
- `label_error`: the share of held-out rows the model gets wrong at `threshold` (binary) or by
  argmax (classes): the baseline of the label-error detector.

Counts follow `training.bootstrap.reference_stats`: values outside the edges are counted in the
end bins, so the counts add up to `rows`. Live counts from `native.histogram` carry an underflow
and an overflow bin; `fold_counts` adds those to the end bins before the two are compared.
Pure NumPy: no torch, no Ray.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = [
    "DEFAULT_BINS", "DEFAULT_PCA_VARIANCE", "quantile_edges", "clipped_counts", "fold_counts", "row_scores",
    "fit_pca", "reconstruction_error", "histogram_reference", "monitoring_reference", "label_errors", "pca_arrays",
]

DEFAULT_BINS = 20
DEFAULT_PCA_VARIANCE = 0.9


def quantile_edges(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """`bins + 1` strictly increasing float32 edges at the quantiles of `values` (ties merged).

    A value repeated over several quantiles (a discrete score) leaves fewer bins; a constant gets
    one bin of width 1 around it.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("quantile_edges needs at least one finite value")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)).astype(np.float32))
    if edges.size < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5], np.float32)
    return edges


def clipped_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """int64 [len(edges) - 1]: counts of `values` in the bins, values beyond the edges in the end bins."""
    edges = np.asarray(edges, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts.astype(np.int64)


def fold_counts(counts: np.ndarray) -> np.ndarray:
    """Live counts [..., b + 2] (underflow, b bins, overflow) as [..., b]: the outer bins added to the end bins."""
    counts = np.asarray(counts)
    out = counts[..., 1:-1].copy()
    out[..., 0] += counts[..., 0]
    out[..., -1] += counts[..., -1]
    return out


def row_scores(output: np.ndarray) -> np.ndarray:
    """float32 [n]: each row's score (its one value, else its largest value) of an output [n, ...]."""
    out = np.asarray(output)
    flat = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
    if flat.shape[1] == 1:
        return flat[:, 0].astype(np.float32, copy=False)
    return flat.max(axis=1).astype(np.float32, copy=False)


def label_errors(output: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """bool [n]: rows whose prediction is wrong: score >= threshold vs a 0/1 label (one value), argmax otherwise."""
    out = np.asarray(output)
    flat = out.reshape(out.shape[0], -1)
    labels = np.asarray(labels).reshape(-1)
    if flat.shape[1] == 1:
        return (flat[:, 0] >= threshold) != (labels == 1)
    return flat.argmax(axis=1) != labels


def fit_pca(z: np.ndarray, variance: float = DEFAULT_PCA_VARIANCE) -> dict:
    """PCA of rows `z` [n, d]: {"mean", "components" [k, d], "variance", "explained"}, k the fewest leading
    components explaining at least `variance` of the total (at most d - 1, so some error is left to watch)."""
    if not 0.0 < variance < 1.0:
        raise ValueError(f"variance must lie in (0, 1), got {variance}")
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(f"fit_pca needs rows [n >= 2, d >= 2], got shape {list(z.shape)}")
    mean = z.mean(axis=0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    share = s**2 / max(float(np.sum(s**2)), 1e-300)
    k = int(np.searchsorted(np.cumsum(share), variance) + 1)
    k = min(max(k, 1), z.shape[1] - 1)
    return {"mean": mean.astype(np.float32).tolist(), "components": vt[:k].astype(np.float32).tolist(),
            "variance": float(variance), "explained": float(np.sum(share[:k]))}


def reconstruction_error(z: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """float32 [n]: ||c - c V^T V||^2 of each centred row c = z - mean, V the components [k, d] (orthonormal)."""
    c = np.asarray(z, dtype=np.float32) - mean
    projected = c @ components.T
    return np.maximum(np.einsum("ij,ij->i", c, c) - np.einsum("ij,ij->i", projected, projected), 0.0)


def histogram_reference(values: np.ndarray, bins: int = DEFAULT_BINS) -> dict:
    """{"edges", "counts", "rows"} of `values` in quantile bins."""
    edges = quantile_edges(values, bins)
    counts = clipped_counts(values, edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "rows": int(counts.sum())}


def monitoring_reference(*, z_train: np.ndarray | None, z_holdout: np.ndarray | None, outputs_holdout: np.ndarray,
                         labels_holdout: np.ndarray, output_name: str, threshold: float = 0.5,
                         pca_variance: float = DEFAULT_PCA_VARIANCE, bins: int = DEFAULT_BINS) -> dict:
    """The `"monitoring"` entry of a version's metadata.json (see the module doc).

    `z_train` / `z_holdout`: the model's standardized input rows (None for a model without tabular
    input: no PCA); `outputs_holdout`: the model's output on the held-out rows, `labels_holdout` their labels.
    The PCA is fitted on the training rows and its error histogram taken on held-out rows, as is the
    score histogram: a model's scores on its own training rows are more confident than on new ones.
    """
    scores = row_scores(outputs_holdout)
    doc: dict = {"scores": {**histogram_reference(scores, bins), "output": output_name}}
    labels = np.asarray(labels_holdout).reshape(-1)
    flat = np.asarray(outputs_holdout).reshape(len(labels), -1)
    if flat.shape[1] == 1 and np.isin(labels, (0, 1)).all() and 0 < labels.sum() < len(labels):
        # A binary classifier: its held-out scores of each class in that class's own quantile bins (a rare class
        # would sit in one bin of the pooled ones), for the ranking detector (serving/monitoring/rank.py).
        doc["scores_by_label"] = {str(c): histogram_reference(scores[labels == c], bins) for c in (0, 1)}
    errors = label_errors(outputs_holdout, labels_holdout, threshold)
    doc["label_error"] = {"rate": float(errors.mean()) if errors.size else None, "rows": int(errors.size),
                          "threshold": float(threshold)}
    if z_train is not None and z_holdout is not None:
        pca = fit_pca(z_train, pca_variance)
        err = reconstruction_error(z_holdout, np.asarray(pca["mean"], np.float32),
                                   np.asarray(pca["components"], np.float32))
        doc["pca"] = {**pca, **histogram_reference(err, bins)}
    return doc


def pca_arrays(pca: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(mean float32 [d], components float32 [k, d]) of a stored `"pca"` entry."""
    return np.asarray(pca["mean"], np.float32), np.ascontiguousarray(np.asarray(pca["components"], np.float32))
