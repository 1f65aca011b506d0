"""The `"monitoring"` entry of every example version's metadata.json, computed from the exported file.

`serving.monitoring.reference.monitoring_reference` defines it (score histogram and
baseline label error on held-out rows, a PCA of the standardized training rows for a
tabular model); these functions feed it what the published file sees and says:

- fraud: the train and holdout rows standardized as the server does
  (`preprocess_reference.standardize` with the version's own statistics and
  `preprocess.clip`), and the exported file's "probability" on the holdout rows;
- digits: no tabular input (no PCA), the exported file's "probabilities" on the
  holdout images normalised as the server does.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from serving.monitoring.reference import monitoring_reference
from training.artifacts import load_torchscript
from training.models import DEFAULT_CLIP
from training.preprocess_reference import standardize

__all__ = ["model_outputs", "fraud_monitoring", "digits_monitoring"]


def model_outputs(model_file: bytes, x: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
    """float32 outputs of an exported file on the (already preprocessed) rows `x`, on the CPU, in batches."""
    module = load_torchscript(model_file)
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.inference_mode():
        parts = [module(x_t[i : i + batch_size]).cpu() for i in range(0, len(x_t), batch_size)]
    if not parts:
        return np.zeros((0, 1), np.float32)
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def fraud_monitoring(model_file: bytes, served: Mapping, x_train: np.ndarray, x_holdout: np.ndarray,
                     y_holdout: np.ndarray, clip: float = DEFAULT_CLIP) -> dict:
    """The monitoring reference of a fraud version: `served` holds its `feature_names` and `reference_stats`."""
    z_train = standardize(x_train, served, clip)
    z_holdout = standardize(x_holdout, served, clip)
    return monitoring_reference(z_train=z_train, z_holdout=z_holdout,
                                outputs_holdout=model_outputs(model_file, z_holdout),
                                labels_holdout=np.asarray(y_holdout), output_name="probability")


def digits_monitoring(model_file: bytes, x_holdout: np.ndarray, y_holdout: np.ndarray) -> dict:
    """The monitoring reference of a digits version from its holdout images normalised as the server does."""
    return monitoring_reference(z_train=None, z_holdout=None, outputs_holdout=model_outputs(model_file, x_holdout),
                                labels_holdout=np.asarray(y_holdout), output_name="probabilities")
