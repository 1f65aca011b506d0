"""The server's per-batch preprocessing, as training and evaluation apply it (NumPy and torch, no `serving`).

A model whose config.pbtxt declares `preprocess: standardize` or `preprocess:
image` is handed what these functions return, not what the client sent, so
training code feeds an exported model through them to see what it will serve:

- `standardize(x, metadata, clip)`: `clip((x - mean) / std, -clip, clip)` in
  float32, `mean`/`std` from metadata `reference_stats` in `feature_names`
  order, a std <= 1e-6 counting as 1 (as FraudMLP's own guard).
- `image_batch(images, size, mean, std)`: grayscale uint8 images, bilinearly
  resized (align_corners=False) to `size`, then `(v / 255 - mean) / std`, as
  float32 [n, 1, H, W].

`feature_stats` is the one definition of the per-feature mean and std a model
trains with and its metadata records, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["STD_FLOOR", "feature_stats", "standardization", "standardize", "image_batch"]

STD_FLOOR = 1e-6  # a feature's std at or below this divides by 1 instead (a constant feature)


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (mean, std) of float32 rows `x` [n, d], as float32 [d] each, accumulated in float32.

    Float32 accumulation is what FraudMLP has always been trained with; the
    metadata records these very numbers so the server standardizes alike.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be [n, d], got shape {list(x.shape)}")
    return x.mean(axis=0), x.std(axis=0)


def standardization(metadata: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [d] the server takes from a version's metadata.json, the std guard applied."""
    try:
        names = list(metadata["feature_names"])
        stats = metadata["reference_stats"]
        mean = np.array([stats[n]["mean"] for n in names], np.float64)
        std = np.array([stats[n]["std"] for n in names], np.float64)
    except (KeyError, TypeError) as exc:
        raise ValueError("metadata needs 'feature_names' and 'reference_stats' with each feature's mean and std") \
            from exc
    std = np.where(std > STD_FLOOR, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize(x: np.ndarray, metadata: Mapping, clip: float) -> np.ndarray:
    """Raw features `x` [n, d] as the server hands them to a `preprocess: standardize` model: float32 [n, d].

    `clip` is the config's `preprocess.clip` (z-scores are clipped to ±clip).
    NaN stays NaN here; the server refuses such rows instead.
    """
    mean, std = standardization(metadata)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != mean.shape[0]:
        raise ValueError(f"x must be [n, {mean.shape[0]}] features, got shape {list(x.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    z = (x - mean) / std
    return np.clip(z, -clip, clip, out=z)


def image_batch(
    images: np.ndarray | Sequence[np.ndarray], size: tuple[int, int], mean: float, std: float
) -> np.ndarray:
    """Grayscale uint8 images ([n, h, w], or a list of [h, w] of any sizes) as a `preprocess: image` model gets them.

    Each image is resized bilinearly to `size` = (H, W), then `(v / 255 - mean) / std`;
    returns float32 [n, 1, H, W].
    """
    import torch
    import torch.nn.functional as F

    height, width = size
    out = np.empty((len(images), 1, height, width), dtype=np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"images[{i}]: expected a uint8 [h, w] image, got {image.dtype} {list(image.shape)}")
        pixels = torch.from_numpy(np.ascontiguousarray(image))[None, None].float()
        resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
        out[i] = ((resized[0] / 255.0 - mean) / std).numpy()
    return out
