"""The digits training loop that runs in every Ray Train worker (`TorchTrainer(train_loop_per_worker=...)`).

Like fraud's (`training.train_loop`): a DDP replica of DigitsCNN per worker on
its shard of "train", the whole "validation" set after each epoch, metrics and
(rank 0) a checkpoint per epoch through `ray.train.report`, a restarted worker
group resuming from the last checkpoint, and the same fault injection. The
batches are normalised images (what the server hands the model), on the
worker's device (`ray.train.torch.get_device()`); the loss is per-row
cross-entropy times the row's weight (example and traffic rows as
`training.data.source_weights` says), averaged.
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import DigitsCNN
from training.train_loop import load_checkpoint_with, report_epoch, row_weights, start_worker, train_epoch

__all__ = ["train_digits_worker", "load_digits_checkpoint", "weighted_cross_entropy", "evaluate_digit_batches"]

_DTYPES = {"image": torch.float32, "label": torch.int64, "traffic": torch.float32}


class _Logits(nn.Module):
    """DigitsCNN's training output as `forward`: DDP synchronises gradients only through forward()."""

    def __init__(self, model: DigitsCNN):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.logits(x)


def build_digits_model(config: dict) -> DigitsCNN:
    return DigitsCNN(channels=tuple(int(c) for c in config["channels"]), hidden=int(config["hidden"]))


def load_digits_checkpoint(checkpoint, config: dict) -> tuple[DigitsCNN, dict]:
    """The DigitsCNN saved in a checkpoint of this loop (eval mode, CPU) and the checkpoint's record."""
    return load_checkpoint_with(checkpoint, config, build_digits_model)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """mean(weight * cross-entropy) over the rows; every tensor on one device."""
    return (F.cross_entropy(logits, labels.reshape(-1).long(), reduction="none") * weights.reshape(-1)).mean()


def evaluate_digit_batches(model: nn.Module, batches: Iterable[dict], device: torch.device, *, weights) -> dict:
    """Validation metrics of a logits model over batches {"image", "label", "traffic"}, computed on `device`.

    `val_loss`: the weighted mean cross-entropy (the training objective on unseen rows);
    `val_accuracy`: the share of rows whose argmax is the label (unweighted).
    """
    model.eval()
    total, weight_sum, rows, correct = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches:
            x, y = batch["image"].to(device), batch["label"].to(device).reshape(-1).long()
            w = row_weights(batch["traffic"].to(device), weights)
            logits = model(x)
            total += float((F.cross_entropy(logits, y, reduction="none") * w).sum())
            weight_sum += float(w.sum())
            correct += int((logits.argmax(dim=1) == y).sum().cpu())
            rows += len(y)
    model.train()
    return {"val_loss": total / weight_sum if weight_sum > 0 else float("nan"),
            "val_accuracy": correct / rows if rows else float("nan"), "val_rows": rows}


def train_digits_worker(config: dict) -> None:
    """`train_loop_per_worker` of the digits TorchTrainer; `config` holds hyper-parameters and row weights."""
    import ray.train

    rank, world, device, model, optimizer, start_epoch, net = start_worker(config, build_digits_model, _Logits)
    weights = config.get("row_weights", (1.0, 1.0))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    epochs = int(config["epochs"])
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        total, rows = train_epoch(
            net, optimizer, train_shard, config, epoch, rank, world, device, _DTYPES,
            lambda batch: weighted_cross_entropy(net(batch["image"]), batch["label"],
                                                 row_weights(batch["traffic"], weights)))
        validation = val_shard.iter_torch_batches(batch_size=1024, dtypes=_DTYPES, device=device)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(rows, 1), "train_rows": rows,
                   **evaluate_digit_batches(net, validation, device, weights=weights)}
        elapsed = time.perf_counter() - started
        metrics["eta_s"] = round(elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1), 1)
        accuracy = metrics["val_accuracy"]
        report_epoch(metrics, model, optimizer, epoch, rank,
                     f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}, validation loss "
                     f"{metrics['val_loss']:.4f}, accuracy {'n/a' if np.isnan(accuracy) else f'{accuracy:.4f}'} "
                     f"({rows} images on rank 0 of {world}; {elapsed:.1f} s, ETA {metrics['eta_s']:.0f} s)")
