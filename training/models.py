"""The example models, as TorchScript-able `torch.nn.Module`s.

Each model carries its own input preprocessing (as buffers), so the exported
TorchScript file is all a worker needs: it takes the raw feature tensor the
client sent and returns what the model's config.pbtxt names as its output.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FraudMLP"]


class FraudMLP(nn.Module):
    """Standardize 30 raw transaction features, then an MLP; `forward` returns P(fraud) in [0, 1], shape [n, 1].

    `mean` and `std` (buffers, from the training data) standardize the input.
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
    ):
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if depth < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need depth >= 1, hidden >= 1 and 0 <= dropout < 1; got {depth}, {hidden}, {dropout}")
        # A constant feature has std 0: divide by 1 instead of blowing up.
        std_t = torch.where(std_t > 1e-6, std_t, torch.ones_like(std_t))
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.register_buffer("logit_offset", torch.zeros(()))
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
        return self.body((features - self.mean) / self.std)

    def forward(self, features: Tensor) -> Tensor:
        """P(fraud) for each row of `features` (float32 [n, 30] raw values), shape [n, 1]."""
        return torch.sigmoid(self.logits(features) + self.logit_offset)
