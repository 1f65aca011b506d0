"""The fraud training loop that runs in every Ray Train worker (`TorchTrainer(train_loop_per_worker=...)`).

Each worker trains a DDP replica of FraudMLP on its shard of the "train"
dataset, evaluates the whole "validation" set after each epoch, and reports
metrics with `ray.train.report`; rank 0 attaches a checkpoint (model and
optimizer state, epoch). A restarted worker group (FailureConfig) resumes from
the latest checkpoint with `ray.train.get_checkpoint()`.

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

import numpy as np
import torch
from torch import nn

from training.models import FraudMLP

__all__ = ["train_fraud_worker", "CHECKPOINT_FILE", "load_checkpoint_model"]

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


def load_checkpoint_model(checkpoint, config: dict) -> tuple[FraudMLP, dict]:
    """The FraudMLP saved in a checkpoint of this loop (eval mode) and the checkpoint's record."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model.eval(), {"epoch": int(state["epoch"]), "val_loss": float(state["val_loss"])}


def _validation(model: nn.Module, shard, loss_fn, batch_size: int) -> dict:
    from sklearn.metrics import roc_auc_score

    model.eval()
    total, rows, scores, labels = 0.0, 0, [], []
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.float32):
            logits = model(batch["features"])
            y = batch["label"].reshape(-1, 1)
            total += float(loss_fn(logits, y)) * len(y)
            rows += len(y)
            scores.append(logits.reshape(-1).numpy())
            labels.append(y.reshape(-1).numpy())
    model.train()
    y = np.concatenate(labels) if labels else np.zeros(0)
    s = np.concatenate(scores) if scores else np.zeros(0)
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    return {"val_loss": total / max(rows, 1), "val_roc_auc": auc, "val_rows": rows}


def _maybe_fail(config: dict, epoch: int, step: int, rank: int, world: int) -> None:
    k, marker = config.get("fail_at_epoch"), config.get("fault_marker")
    if k is None or marker is None or epoch != int(k) or step != _FAIL_AT_STEP or rank != world - 1:
        return
    path = Path(marker)
    if path.exists():
        return  # it happened once already: this is the resumed run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"worker rank {rank} killed itself at epoch {epoch}\n")
    print(f"[fault injection] worker rank {rank} exits hard in epoch {epoch + 1}, batch {step}", flush=True)
    os._exit(1)


def train_fraud_worker(config: dict) -> None:
    """`train_loop_per_worker` of the fraud TorchTrainer; `config` holds hyper-parameters and data statistics."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(int(config.get("threads", 1)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(int(config["seed"]) + rank)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {start_epoch} ({checkpoint.path})", flush=True)
    net = ray.train.torch.prepare_model(_Logits(model))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(config["pos_weight"])]))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    epochs, batch_size = int(config["epochs"]), int(config["batch_size"])
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        net.train()
        total, rows = 0.0, 0
        for step, batch in enumerate(train_shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.float32,
                                                    local_shuffle_buffer_size=4 * batch_size)):
            _maybe_fail(config, epoch, step, rank, world)
            x, y = batch["features"], batch["label"].reshape(-1, 1)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            rows += len(y)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(rows, 1), "train_rows": rows,
                   **_validation(net, val_shard, loss_fn, 4096)}
        done = epoch + 1 - start_epoch
        elapsed = time.perf_counter() - started
        metrics["eta_s"] = round(elapsed / done * (epochs - epoch - 1), 1)
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "val_loss": metrics["val_loss"]}, Path(folder) / CHECKPOINT_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                auc = metrics["val_roc_auc"]
                print(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}, "
                      f"validation loss {metrics['val_loss']:.4f}, AUC {'n/a' if math.isnan(auc) else f'{auc:.4f}'} "
                      f"({rows} rows on rank 0 of {world}; {elapsed:.1f} s, ETA {metrics['eta_s']:.0f} s)", flush=True)
            ray.train.report(metrics, checkpoint=report_checkpoint)
