"""The pieces of the Ray Train loops that run on the worker's device, exercised on the CPU without Ray.

The loops hand every helper the device of their batches (`ray.train.torch.get_device()`); here it
is `torch.device("cpu")`, and the numbers are checked against plain NumPy / scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ray.train import Checkpoint
from sklearn.metrics import roc_auc_score
from torch import nn

from training.digits_loop import evaluate_digit_batches, load_digits_checkpoint, weighted_cross_entropy
from training.models import DigitsCNN
from training.train_loop import CHECKPOINT_FILE, evaluate_batches, resume_from, row_weights, weighted_bce

CPU = torch.device("cpu")


def _bce(logit: np.ndarray, y: np.ndarray, pos_weight: float) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
    return -(pos_weight * y * np.log(p) + (1 - y) * np.log1p(-p))


def test_weighted_bce_multiplies_each_rows_loss_by_its_weight():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=64).astype(np.float32), (rng.random(64) < 0.3).astype(np.float32)
    traffic = (rng.random(64) < 0.5).astype(np.float32)
    w = row_weights(torch.from_numpy(traffic), (0.5, 3.0))
    np.testing.assert_allclose(w.numpy(), np.where(traffic == 1, 3.0, 0.5))
    loss = weighted_bce(torch.from_numpy(logits)[:, None], torch.from_numpy(y), w, torch.tensor(4.0, device=CPU))
    expected = np.mean(np.where(traffic == 1, 3.0, 0.5) * _bce(logits, y, 4.0))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Weights of 1 are the unweighted loss the loops trained with before.
    plain = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([4.0]))(torch.from_numpy(logits), torch.from_numpy(y))
    ones = weighted_bce(torch.from_numpy(logits), torch.from_numpy(y), torch.ones(64), torch.tensor(4.0))
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)


class _DigitLogits(nn.Module):
    """DigitsCNN's logits as forward, as the loop wraps it for DDP."""

    def __init__(self, model: DigitsCNN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x)


class _Fixed(nn.Module):
    """A 'model' whose logit is the row's first feature: its metrics are known in advance."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale


def test_validation_on_a_device_weights_the_loss_and_scores_auc_on_the_cpu():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=300) > 1.0).astype(np.float32)
    traffic = (np.arange(300) % 3 == 0).astype(np.float32)
    batches = [{"features": torch.from_numpy(x[i:i + 128]), "label": torch.from_numpy(y[i:i + 128]),
                "traffic": torch.from_numpy(traffic[i:i + 128])} for i in range(0, 300, 128)]
    model = _Fixed().train()
    out = evaluate_batches(model, batches, CPU, pos_weight=torch.tensor(2.0), weights=(1.0, 4.0))
    w = np.where(traffic == 1, 4.0, 1.0)
    assert out["val_rows"] == 300
    assert out["val_loss"] == pytest.approx(np.sum(w * _bce(x[:, 0], y, 2.0)) / np.sum(w), rel=1e-5)
    assert out["val_roc_auc"] == pytest.approx(roc_auc_score(y, x[:, 0]))
    assert model.training  # left in training mode, as the loop expects
    one_class = evaluate_batches(model, [{**batches[0], "label": torch.zeros(128)}], CPU,
                                 pos_weight=torch.tensor(2.0), weights=(1.0, 1.0))
    assert math.isnan(one_class["val_roc_auc"])


def test_digits_loss_and_validation_on_a_device():
    torch.manual_seed(0)
    logits = torch.randn(40, 10)
    y = torch.randint(0, 10, (40,))
    traffic = (torch.arange(40) % 4 == 0).float()
    w = row_weights(traffic, (0.8, 2.0))
    per_row = nn.functional.cross_entropy(logits, y, reduction="none")
    assert float(weighted_cross_entropy(logits, y, w)) == pytest.approx(float((per_row * w).mean()), rel=1e-6)

    model = DigitsCNN().train()
    images = torch.randn(40, 1, 8, 8)
    batches = [{"image": images[:25], "label": y[:25], "traffic": traffic[:25]},
               {"image": images[25:], "label": y[25:], "traffic": traffic[25:]}]
    out = evaluate_digit_batches(_DigitLogits(model), batches, CPU, weights=(0.8, 2.0))
    with torch.inference_mode():
        ref_logits = model.eval().logits(images)
    model.train()
    expected = nn.functional.cross_entropy(ref_logits, y, reduction="none")
    assert out["val_loss"] == pytest.approx(float((expected * w).sum() / w.sum()), rel=1e-5)
    assert out["val_accuracy"] == pytest.approx(float((ref_logits.argmax(1) == y).float().mean()))
    assert out["val_rows"] == 40


def test_a_resumed_worker_continues_after_the_checkpointed_epoch(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN(channels=(4, 8), hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.logits(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "val_loss": 0.25},
               tmp_path / CHECKPOINT_FILE)
    checkpoint = Checkpoint.from_directory(str(tmp_path))
    fresh = DigitsCNN(channels=(4, 8), hidden=16).to(CPU)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    assert resume_from(checkpoint, fresh, fresh_opt, rank=1) == 4
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert resume_from(None, fresh, fresh_opt, rank=0) == 0
    loaded, info = load_digits_checkpoint(checkpoint, {"channels": [4, 8], "hidden": 16})
    assert info == {"epoch": 3, "val_loss": 0.25} and not loaded.training


class _Shard:
    """What `ray.train.get_dataset_shard` hands a loop, over in-memory columns: batches of tensors on a device."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns
        self.calls = []

    def iter_torch_batches(self, *, batch_size, dtypes, device, local_shuffle_buffer_size):
        self.calls.append((batch_size, dtypes, device, local_shuffle_buffer_size))
        n = len(next(iter(self.columns.values())))
        for start in range(0, n, batch_size):
            yield {k: torch.as_tensor(v[start:start + batch_size], dtype=dtypes, device=device)
                   for k, v in self.columns.items()}


def test_train_epoch_steps_the_optimiser_on_every_batch_and_counts_rows_and_loss():
    from training.train_loop import train_epoch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(250, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    shard = _Shard({"features": x, "label": y, "traffic": np.zeros(250, np.float32)})
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    config = {"batch_size": 64}

    def loss_of(batch):
        return weighted_bce(net(batch["features"]), batch["label"], row_weights(batch["traffic"], (1.0, 1.0)),
                            torch.tensor(1.0))

    losses = []
    for epoch in range(5):
        total, rows = train_epoch(net, optimizer, shard, config, epoch, 0, 1, CPU, torch.float32, loss_of)
        assert rows == 250
        losses.append(total / rows)
    # Every epoch asked for shuffled batches of the configured size on the worker's device.
    assert shard.calls == [(64, torch.float32, CPU, 256)] * 5
    # The optimiser stepped: a separable set's loss falls well below where it started.
    assert losses[-1] < 0.5 * losses[0]
    assert net.training
