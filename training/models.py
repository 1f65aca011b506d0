"""The example models, as TorchScript-able `torch.nn.Module`s.

The exported TorchScript file takes what the model's config.pbtxt `preprocess`
parameters make of the client's tensor (see `training.preprocess_reference`):
- FraudMLP: z-scored, clipped features (`preprocess: standardize`). It trains on
  raw features with the same statistics inside; `for_serving()` is the copy to
  export, whose forward skips that step because the server has done it.
- DigitsCNN: normalised float32 images [n, 1, 8, 8] (`preprocess: image`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from training.preprocess_reference import STD_FLOOR

__all__ = ["FraudMLP", "DigitsCNN", "DEFAULT_CLIP"]

DEFAULT_CLIP = 10.0  # |z-score| bound of the fraud features, in training and in the config's `preprocess.clip`


class FraudMLP(nn.Module):
    """An MLP over 30 transaction features; `forward` returns P(fraud) in [0, 1], shape [n, 1].

    `mean` and `std` (buffers, from the training data) standardize raw input
    while `prestandardized` is False (training, eager evaluation). With it True
    (`for_serving()`, the exported file) the input must already be
    `(x - mean) / std`, clipped as the config's `preprocess.clip` says; the
    buffers stay in the file as a record of the statistics.
    `logit_offset` (a buffer, 0 by default) is added to the logit before the
    sigmoid: training with BCE `pos_weight=w` inflates the odds by `w`, and an
    offset of `-log(w)` turns the output back into a calibrated probability.
    Train on `logits()`; serve `forward()`.
    """

    def __init__(
        self,
        mean: Tensor | np.ndarray,
        std: Tensor | np.ndarray,
        *,
        hidden: int = 64,
        depth: int = 2,
        dropout: float = 0.1,
        clip: float = DEFAULT_CLIP,
    ):
        super().__init__()
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if depth < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need depth >= 1, hidden >= 1 and 0 <= dropout < 1; got {depth}, {hidden}, {dropout}")
        # A constant feature has std 0: divide by 1 instead of blowing up (the server's guard is the same).
        std_t = torch.where(std_t > STD_FLOOR, std_t, torch.ones_like(std_t))
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("logit_offset", torch.zeros(()))
        self.prestandardized = False  # a plain bool attribute: TorchScript keeps it, and its value, in the file
        self.clip = float(clip)  # z-scores are clipped to ±clip in training as the server clips them
        self.n_features = int(mean_t.numel())
        self.hidden = int(hidden)
        self.depth = int(depth)
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = self.n_features
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU(), nn.Dropout(self.dropout)]
            width = self.hidden
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def logits(self, features: Tensor) -> Tensor:
        """The raw fraud logit, [n, 1], without `logit_offset` (what the training loss sees)."""
        if self.prestandardized:
            return self.body(features)
        return self.body(((features - self.mean) / self.std).clamp(-self.clip, self.clip))

    def forward(self, features: Tensor) -> Tensor:
        """P(fraud) for each row of `features` (float32 [n, 30]: raw, or z-scores if prestandardized), [n, 1]."""
        return torch.sigmoid(self.logits(features) + self.logit_offset)

    def for_serving(self) -> FraudMLP:
        """A copy in eval mode that takes standardized features (what `preprocess: standardize` hands it)."""
        served = copy.deepcopy(self).eval()
        served.prestandardized = True
        return served


class DigitsCNN(nn.Module):
    """A small CNN for 8 x 8 grayscale digits: float32 [n, 1, 8, 8] in, class probabilities [n, 10] out.

    Two 3 x 3 convolutions (1 -> `channels[0]` -> `channels[1]`, padding 1), a
    2 x 2 max-pool, then a `hidden`-wide layer and 10 logits. Train on
    `logits()`; `forward()` serves the softmax, each row summing to 1.
    """

    def __init__(self, *, channels: tuple[int, int] = (16, 32), hidden: int = 64, n_classes: int = 10):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if min(c1, c2, hidden, n_classes) < 1:
            raise ValueError(f"need positive channels, hidden and n_classes; got {channels}, {hidden}, {n_classes}")
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def logits(self, images: Tensor) -> Tensor:
        """Unnormalised class scores [n, 10] (what the cross-entropy loss sees)."""
        return self.head(self.features(images))

    def forward(self, images: Tensor) -> Tensor:
        """P(class) for each image of `images` (float32 [n, 1, 8, 8], normalised), shape [n, 10]."""
        return torch.softmax(self.logits(images), dim=1)
