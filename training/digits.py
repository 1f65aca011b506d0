"""Train the example `digits` model (a small CNN on scikit-learn's 8 x 8 digits) and publish it.

Clients send uint8 grayscale images of any size; the config declares
`preprocess: image`, so the server resizes each to 8 x 8 and normalises it
(`(v / 255 - 0.5) / 0.5`) before the model runs. Training normalises with the
very same function (`training.preprocess_reference.image_batch`), and the
holdout accuracy recorded in metadata.json is that of the exported file fed
what the server feeds it, and so is its monitoring reference (score histogram
and baseline label error: `training.reference.digits_monitoring`).
`python -m training.bootstrap` publishes it beside fraud; `python -m
training.retrain --model digits` retrains it as a Ray job (training.digits_job).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import sklearn
import torch
from torch import Tensor, nn

from serving.model_config import ModelConfig, TensorSpec, make_config
from serving.registry import ModelRepository
from training.artifacts import arrays_sha256, export_torchscript, load_torchscript, version_metadata
from training.datasets import load_digits
from training.models import DigitsCNN
from training.preprocess_reference import image_batch
from training.reference import digits_monitoring

__all__ = [
    "DIGITS_MODEL", "DIGITS_SIZE", "DIGITS_MEAN", "DIGITS_STD", "DigitsParams", "digits_config", "normalize_digits",
    "fit_digits", "evaluate_digits", "bootstrap_digits",
]  # fmt: skip

DIGITS_MODEL = "digits"
DIGITS_SIZE = (8, 8)  # (H, W) the server resizes every image to
DIGITS_MEAN = 0.5  # of v / 255, the config's `preprocess.mean`
DIGITS_STD = 0.5  # the config's `preprocess.std`
_SOURCE = "sklearn.datasets.load_digits"


@dataclass(frozen=True)
class DigitsParams:
    """Hyper-parameters of one digits training run (stored as metadata `params`)."""

    channels: tuple[int, int] = (16, 32)
    hidden: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 20
    holdout_fraction: float = 0.2


def digits_config() -> ModelConfig:
    """The digits config.pbtxt: uint8 image [h, w] of any size in, probabilities FP32 [10] out, dynamic batching."""
    return make_config(
        DIGITS_MODEL,
        inputs=[TensorSpec("image", "UINT8", (-1, -1))],
        outputs=[TensorSpec("probabilities", "FP32", (10,))],
        max_batch_size=64,
        max_queue_delay_us=1000,
        max_queue_size=4096,
        parameters={
            "preprocess": "image",
            "preprocess.size": ",".join(str(s) for s in DIGITS_SIZE),
            "preprocess.mean": f"{DIGITS_MEAN:g}",
            "preprocess.std": f"{DIGITS_STD:g}",
        },
    )


def normalize_digits(images: np.ndarray) -> np.ndarray:
    """uint8 images [n, h, w] as the server hands them to the digits model: float32 [n, 1, 8, 8]."""
    return image_batch(images, DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)


def fit_digits(
    images: np.ndarray,
    labels: np.ndarray,
    params: DigitsParams = DigitsParams(),
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> DigitsCNN:
    """Train a DigitsCNN on uint8 `images` [n, 8, 8] and int64 `labels` [n] with Adam and cross-entropy; eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(channels=params.channels, hidden=params.hidden)
    x = torch.from_numpy(normalize_digits(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(params.epochs):
        model.train()
        total = 0.0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), params.batch_size):
            idx = order[start : start + params.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model.logits(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        if log is not None:
            log(f"digits epoch {epoch + 1}/{params.epochs}: train loss {total / max(len(x), 1):.4f}")
    return model.eval()


def evaluate_digits(model: Callable[[Tensor], Tensor], x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy and mean log loss of a model returning probabilities [n, 10] on normalised images `x` [n, 1, 8, 8]."""
    with torch.inference_mode():
        probs = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).double().numpy()
    y = np.asarray(y).reshape(-1)
    picked = probs[np.arange(len(y)), y].clip(1e-7, 1.0)
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == y)), "loss": float(-np.mean(np.log(picked)))}


def bootstrap_digits(
    repository: str,
    *,
    seed: int = 0,
    params: DigitsParams | None = None,
    num_threads: int = 2,
    log: Callable[[str], None] = print,
) -> int:
    """Train the digits model on scikit-learn's digits (seeded split) and publish it; return the new version.

    Sets torch's intra-op threads to `num_threads` for the process.
    """
    started = time.perf_counter()
    torch.set_num_threads(num_threads)
    params = params or DigitsParams()
    data = load_digits(seed=seed, holdout_fraction=params.holdout_fraction)
    model = fit_digits(data.x_train, data.y_train, params, seed=seed)
    model_file = export_torchscript(model)
    # The published file, fed what the server feeds it.
    x_holdout = normalize_digits(data.x_holdout)
    metrics = evaluate_digits(load_torchscript(model_file), x_holdout, data.y_holdout)
    training_data = {
        "source": _SOURCE,
        "sklearn": sklearn.__version__,
        "seed": seed,
        "rows": int(len(data.y_train) + len(data.y_holdout)),
        "train_rows": int(len(data.y_train)),
        "holdout_rows": int(len(data.y_holdout)),
        "split": "a random permutation of the rows (numpy default_rng(seed)); the last holdout_rows are the holdout",
        "pixels": "uint8, rint(v * 255 / 16) of the bundled 0..16 values",
        "sha256": arrays_sha256(data.x_train, data.y_train),
    }
    run_params = {
        **asdict(params),
        "channels": list(params.channels),
        "seed": seed,
        "num_threads": num_threads,
        "optimizer": "adam",
        "loss": "cross_entropy",
    }
    metadata = version_metadata(
        training_data=training_data,
        params=run_params,
        metrics={**metrics, "holdout_rows": int(len(data.y_holdout))},
        class_names=[str(c) for c in range(10)],
        monitoring=digits_monitoring(model_file, x_holdout, data.y_holdout),
    )
    repo = ModelRepository(repository)
    version = repo.publish(DIGITS_MODEL, {"model.pt": model_file}, metadata, config=digits_config())
    log(
        f"published {DIGITS_MODEL} version {version} at {repo.version(DIGITS_MODEL, version).path}: "
        f"holdout accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} "
        f"({len(data.y_train)} train images, {params.epochs} epochs, {time.perf_counter() - started:.1f} s)"
    )
    return version
