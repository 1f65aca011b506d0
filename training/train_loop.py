"""The fraud training loop that runs in every Ray Train worker (`TorchTrainer(train_loop_per_worker=...)`).

Each worker trains a DDP replica of FraudMLP on its shard of the "train"
dataset, evaluates the whole "validation" set after each epoch, and reports
metrics with `ray.train.report`; rank 0 attaches a checkpoint (model and
optimizer state, epoch). A restarted worker group (FailureConfig) resumes from
the latest checkpoint with `ray.train.get_checkpoint()`.

Everything runs on the worker's device (`ray.train.torch.get_device()`: its GPU
when the trainer has `use_gpu`): the model, the batches (`iter_torch_batches(
device=...)`), `pos_weight` and the per-row weights; scores come back with
`.cpu()` before NumPy. The loss is per-row BCE times the row's weight (example
and traffic rows weigh as `training.data.source_weights` says), averaged.

Fault injection for tests: `fail_at_epoch` = k makes the last rank exit hard
(os._exit) midway through epoch k, once per run: a marker file under
`fault_marker` records that it happened, so the resumed run goes on.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models import FraudMLP

__all__ = ["train_fraud_worker", "CHECKPOINT_FILE", "load_checkpoint_model", "row_weights", "weighted_bce",
           "evaluate_batches", "maybe_fail", "resume_from", "report_epoch", "start_worker", "train_epoch",
           "load_checkpoint_with"]

CHECKPOINT_FILE = "state.pt"
_FAIL_AT_STEP = 5  # fault injection: mid-epoch, as a crash would come


class _Logits(nn.Module):
    """FraudMLP's training output as `forward`: DDP synchronises gradients only through forward()."""

    def __init__(self, model: FraudMLP):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


def build_model(config: dict) -> FraudMLP:
    return FraudMLP(np.asarray(config["mean"], np.float32), np.asarray(config["std"], np.float32),
                    hidden=int(config["hidden"]), depth=int(config["depth"]), dropout=float(config["dropout"]))


def load_checkpoint_with(checkpoint, config: dict, build) -> tuple[nn.Module, dict]:
    """The model `build(config)` holding the weights saved in a checkpoint of these loops (eval mode, CPU) and
    the checkpoint's record."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = build(config)
    model.load_state_dict(state["model"])
    return model.eval(), {"epoch": int(state["epoch"]), "val_loss": float(state["val_loss"])}


def load_checkpoint_model(checkpoint, config: dict) -> tuple[FraudMLP, dict]:
    """The FraudMLP saved in a checkpoint of this loop (eval mode) and the checkpoint's record."""
    return load_checkpoint_with(checkpoint, config, build_model)


def row_weights(traffic: Tensor, weights) -> Tensor:
    """Each row's loss weight [n] from its `traffic` flag (1.0 traffic, 0.0 example) and (example, traffic) weights."""
    example_w, traffic_w = (float(w) for w in weights)
    flag = traffic.reshape(-1).to(torch.float32)
    return example_w + (traffic_w - example_w) * flag


def weighted_bce(logits: Tensor, labels: Tensor, weights: Tensor, pos_weight: Tensor) -> Tensor:
    """mean(weight * BCE-with-logits(pos_weight)) over the rows; every tensor on one device."""
    per_row = F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.reshape(-1).to(logits.dtype),
                                                 pos_weight=pos_weight, reduction="none")
    return (per_row * weights.reshape(-1)).mean()


def evaluate_batches(model: nn.Module, batches: Iterable[dict], device: torch.device, *, pos_weight: Tensor,
                     weights) -> dict:
    """Validation metrics of a logits model over batches {"features", "label", "traffic"}, computed on `device`.

    `val_loss` is the weighted mean BCE (sum of weight * loss over sum of weight: the training
    objective on unseen rows), `val_roc_auc` the unweighted ROC AUC (NaN with one class).
    """
    from sklearn.metrics import roc_auc_score

    model.eval()
    pos_weight = pos_weight.to(device)
    total, weight_sum, rows, scores, labels = 0.0, 0.0, 0, [], []
    with torch.inference_mode():
        for batch in batches:
            x, y = batch["features"].to(device), batch["label"].to(device).reshape(-1)
            w = row_weights(batch["traffic"].to(device), weights)
            logits = model(x).reshape(-1)
            per_row = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
            total += float((per_row * w).sum())
            weight_sum += float(w.sum())
            rows += len(y)
            scores.append(logits.cpu().numpy())
            labels.append(y.cpu().numpy())
    model.train()
    y = np.concatenate(labels) if labels else np.zeros(0)
    s = np.concatenate(scores) if scores else np.zeros(0)
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    return {"val_loss": total / weight_sum if weight_sum > 0 else float("nan"), "val_roc_auc": auc, "val_rows": rows}


def maybe_fail(config: dict, epoch: int, step: int, rank: int, world: int) -> None:
    """Fault injection: the last rank exits hard at batch 5 of epoch `fail_at_epoch`, once per run."""
    k, marker = config.get("fail_at_epoch"), config.get("fault_marker")
    if k is None or marker is None or epoch != int(k) or step != _FAIL_AT_STEP or rank != world - 1:
        return
    path = Path(marker)
    if path.exists():
        return  # it happened once already: this is the resumed run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"worker rank {rank} killed itself at epoch {epoch}\n")
    # Ray Train's controller collects the workers' reports (the last epoch's checkpoint) when it polls them,
    # every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s); a worker dying before that poll loses the report and the
    # run restarts from scratch (seen once in a fresh-clone `make test`). Die after two polls, as a crash some
    # seconds into an epoch would.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    print(f"[fault injection] worker rank {rank} exits hard in epoch {epoch + 1}, batch {step}", flush=True)
    os._exit(1)


def resume_from(checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> int:
    """Load a checkpoint of these loops into `model` (already on its device) and `optimizer`; the epoch to start at.

    The optimizer's state is moved to its parameters' device by `load_state_dict`, so the model
    must be on the device before (a CPU state stepping CUDA parameters fails).
    """
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["epoch"]) + 1
    if rank == 0:
        print(f"resuming from the checkpoint of epoch {start} ({checkpoint.path})", flush=True)
    return start


def report_epoch(metrics: dict, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, rank: int,
                 line: str) -> None:
    """`ray.train.report(metrics)`; rank 0 attaches a checkpoint of the model and optimizer, and prints `line`."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        report_checkpoint = None
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "val_loss": metrics["val_loss"]}, Path(folder) / CHECKPOINT_FILE)
            report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            nice = os.getpriority(os.PRIO_PROCESS, 0)  # the job's CPU priority (training/priority.py)
            print(f"{line}; nice {nice}" if nice > 0 else line, flush=True)
        ray.train.report(metrics, checkpoint=report_checkpoint)


def start_worker(config: dict, build, wrap) -> tuple:
    """What an example model's Ray Train loop begins with, on each worker: torch threads, rank, the worker's
    device, the seed, the model (`build(config)`) on the device with its Adam optimizer, resumed from the
    group's last checkpoint, and DDP around `wrap(model)`.

    Returns (rank, world size, device, model, optimizer, first epoch to run, the DDP module).
    """
    import ray.train
    import ray.train.torch

    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(int(config["seed"]) + rank)
    model = build(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    start_epoch = resume_from(ray.train.get_checkpoint(), model, optimizer, rank)
    return rank, world, device, model, optimizer, start_epoch, ray.train.torch.prepare_model(wrap(model))


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, shard, config: dict, epoch: int, rank: int,
                world: int, device: torch.device, dtypes, loss_of) -> tuple[float, int]:
    """One epoch over this worker's shard of "train" (shuffled locally, on `device`): for each batch the
    fault injection, `loss_of(batch)`, a backward pass and an optimiser step.

    Returns (sum of batch loss × batch rows, rows).
    """
    net.train()
    batch_size = int(config["batch_size"])
    total, rows = 0.0, 0
    for step, batch in enumerate(shard.iter_torch_batches(
            batch_size=batch_size, dtypes=dtypes, device=device, local_shuffle_buffer_size=4 * batch_size)):
        maybe_fail(config, epoch, step, rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        n = len(batch["label"])
        total += float(loss.detach()) * n
        rows += n
    return total, rows


def train_fraud_worker(config: dict) -> None:
    """`train_loop_per_worker` of the fraud TorchTrainer; `config` holds hyper-parameters and data statistics."""
    import ray.train

    rank, world, device, model, optimizer, start_epoch, net = start_worker(config, build_model, _Logits)
    pos_weight = torch.tensor(float(config["pos_weight"]), dtype=torch.float32, device=device)
    weights = config.get("row_weights", (1.0, 1.0))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    epochs = int(config["epochs"])
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        total, rows = train_epoch(
            net, optimizer, train_shard, config, epoch, rank, world, device, torch.float32,
            lambda batch: weighted_bce(net(batch["features"]), batch["label"],
                                       row_weights(batch["traffic"], weights), pos_weight))
        validation = val_shard.iter_torch_batches(batch_size=4096, dtypes=torch.float32, device=device)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(rows, 1), "train_rows": rows,
                   **evaluate_batches(net, validation, device, pos_weight=pos_weight, weights=weights)}
        done = epoch + 1 - start_epoch
        elapsed = time.perf_counter() - started
        metrics["eta_s"] = round(elapsed / done * (epochs - epoch - 1), 1)
        auc = metrics["val_roc_auc"]
        report_epoch(metrics, model, optimizer, epoch, rank,
                     f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}, "
                     f"validation loss {metrics['val_loss']:.4f}, AUC {'n/a' if math.isnan(auc) else f'{auc:.4f}'} "
                     f"({rows} rows on rank 0 of {world}; {elapsed:.1f} s, ETA {metrics['eta_s']:.0f} s)")
