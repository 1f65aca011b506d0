"""Train the example `fraud` model with plain PyTorch and publish it into a model repository.

`python -m training.bootstrap --repository DIR [--if-empty] [--rows N] [--epochs E] [--seed S] [--trainer ray|plain]`
publishes fraud and the `digits` example (training/digits.py). By default fraud
goes through the job path: the example parquet data, then `training.retrain`
on a short local Ray run (`--trainer plain`: the loop below, in this process).

`make serve` runs this with `--if-empty` on a fresh clone, so a new cluster has
models to serve without downloading anything. The pieces (train loop,
evaluation, reference statistics, TorchScript export, metadata) are plain
functions so the Ray Train job can reuse them inside its workers.

The server standardizes fraud's features (`preprocess: standardize` in its
config, with the mean and std of metadata `reference_stats`), so the exported
model takes z-scores: `FraudMLP.for_serving()`. The model trains on raw rows
with those same statistics inside, and the holdout metrics are those of the
exported file fed `preprocess_reference.standardize(...)`: what it serves.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from serving.model_config import ModelConfig, TensorSpec, make_config
from serving.registry import ModelRepository
from training.artifacts import arrays_sha256, export_torchscript, git_sha, load_torchscript, version_metadata
from training.datasets import FRAUD_FEATURES, make_fraud
from training.digits import bootstrap_digits
from training.models import DEFAULT_CLIP, FraudMLP
from training.preprocess_reference import feature_stats, standardize
from training.reference import fraud_monitoring
from training.train_loop import weighted_bce

__all__ = [
    "FRAUD_MODEL", "FRAUD_CLIP", "TrainParams", "fraud_config", "split_holdout", "iterate_batches", "train_epoch",
    "fit_fraud", "evaluate", "score_file", "reference_stats", "export_torchscript", "arrays_sha256", "git_sha", "fraud_metadata",
    "bootstrap", "main",
]  # fmt: skip

FRAUD_MODEL = "fraud"
FRAUD_CLIP = DEFAULT_CLIP  # the config's `preprocess.clip`: z-scores are clipped to ±10, in training too
_GENERATOR = "training.datasets.make_fraud"


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one fraud training run (stored as metadata `params`)."""

    hidden: int = 64
    depth: int = 2
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 10
    holdout_fraction: float = 0.2


def fraud_config() -> ModelConfig:
    """The fraud model's config.pbtxt: features FP32 [30] in, probability FP32 [1] out, dynamic batching.

    `preprocess: standardize` has the server z-score and clip (`preprocess.clip`)
    the raw features before the model runs: the published model takes z-scores.
    """
    return make_config(
        FRAUD_MODEL,
        [TensorSpec("features", "FP32", (len(FRAUD_FEATURES),))],
        [TensorSpec("probability", "FP32", (1,))],
        max_batch_size=256,
        max_queue_delay_us=1000,
        max_queue_size=4096,
        instance_count=1,
        parameters={"preprocess": "standardize", "preprocess.clip": f"{FRAUD_CLIP:g}"},
    )


def split_holdout(x: np.ndarray, y: np.ndarray, holdout_fraction: float):
    """(x_train, y_train, x_holdout, y_holdout): the last `holdout_fraction` of the rows is the holdout.

    The generator's rows are i.i.d., so a plain cut is a random split and stays reproducible.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    n_train = len(x) - max(1, int(round(len(x) * holdout_fraction)))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def iterate_batches(x: Tensor, y: Tensor, w: Tensor, batch_size: int,
                    generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Shuffled (features, labels, weights) mini-batches of one epoch; labels come back as float [b]."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx].to(torch.float32), w[idx]


def train_epoch(
    model: FraudMLP,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    pos_weight: Tensor,
) -> float:
    """One pass over `batches`, training on `model.logits` with weighted BCE; returns the mean training loss per row."""
    model.train()
    total, rows = 0.0, 0
    for xb, yb, wb in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = weighted_bce(model.logits(xb), yb, wb, pos_weight)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(xb)
        rows += len(xb)
    return total / max(rows, 1)


def fit_fraud(
    x: np.ndarray,
    y: np.ndarray,
    params: TrainParams = TrainParams(),
    *,
    seed: int = 0,
    weights: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> FraudMLP:
    """Train a FraudMLP on (x, y) with Adam and class-weighted BCE; return it in eval mode.

    `pos_weight = negatives / positives` balances the ~1% positives; the model's
    `logit_offset` is then set to `-log(pos_weight)` so `forward` serves a
    calibrated probability rather than the weighted one. The model standardizes
    with `feature_stats(x)`, the numbers `reference_stats(x, ...)` records.
    `weights` [n] (default all 1) multiply each row's loss, and count in `pos_weight`:
    the Ray job's loop (`training.train_loop`) trains alike.
    """
    torch.manual_seed(seed)
    mean, std = feature_stats(x)
    model = FraudMLP(mean, std, hidden=params.hidden, depth=params.depth, dropout=params.dropout)
    w = np.ones(len(y), np.float32) if weights is None else np.asarray(weights, np.float32)
    positives = float(np.sum(w * (y == 1)))
    negatives = float(np.sum(w * (y != 1)))
    if positives <= 0 or negatives <= 0:
        raise ValueError(f"training data needs both classes; got {int(y.sum())} positives in {len(y)} rows")
    pos_weight = negatives / positives
    pos_weight_t = torch.tensor(pos_weight, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y))
    w_t = torch.from_numpy(w)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(params.epochs):
        loss = train_epoch(model, iterate_batches(x_t, y_t, w_t, params.batch_size, generator), optimizer,
                           pos_weight_t)
        if log is not None:
            log(f"epoch {epoch + 1}/{params.epochs}: weighted train loss {loss:.4f}")
    model.logit_offset.fill_(-math.log(pos_weight))
    return model.eval()


def evaluate(model: Callable[[Tensor], Tensor], x: np.ndarray, y: np.ndarray, *, batch_size: int = 8192) -> dict:
    """Holdout metrics of a model that returns P(fraud) [n, 1]: log loss, accuracy at 0.5, ROC AUC.

    `x` goes to the model as it is: raw rows for an eager FraudMLP, and
    `standardize(x, metadata, FRAUD_CLIP)` for the exported file (which takes
    z-scores). `roc_auc` is None when `y` holds a single class (it is undefined then).
    """
    from sklearn.metrics import roc_auc_score

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.inference_mode():
        probs = torch.cat([model(x_t[i : i + batch_size]) for i in range(0, len(x_t), batch_size)]).reshape(-1)
    if was_training:
        model.train()
    p = probs.double().numpy().clip(1e-7, 1.0 - 1e-7)
    y = np.asarray(y).reshape(-1)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
    return {"loss": float(loss), "accuracy": float(np.mean((p >= 0.5) == (y == 1))), "roc_auc": auc}


def score_file(model_file: bytes, served: Mapping, x: np.ndarray, y: np.ndarray, clip: float = FRAUD_CLIP) -> dict:
    """`evaluate` of an exported fraud file fed `x` standardized as the server would with `served`'s statistics.

    `served` is a version's metadata.json, or anything with its `feature_names` and `reference_stats`.
    """
    return evaluate(load_torchscript(model_file), standardize(x, served, clip), y)


def reference_stats(x: np.ndarray, feature_names: Sequence[str], *, bins: int = 20) -> dict:
    """Per-feature training statistics for drift detection: {name: {mean, std, edges, counts}}.

    `edges` are `bins + 1` equal-width edges from the 0.5th to the 99.5th
    percentile; `counts` histogram the training data into those bins with values
    outside the range counted in the end bins (clip first), so counts sum to the
    row count. Bin live traffic the same way before computing PSI.
    `mean` and `std` are `feature_stats(x)`: what FraudMLP trains with and the
    server standardizes with, float32 values written exactly.
    """
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise ValueError(f"x must be [n, {len(feature_names)}], got {list(x.shape)}")
    means, stds = feature_stats(x)
    stats = {}
    for i, name in enumerate(feature_names):
        col = x[:, i].astype(np.float64)
        lo, hi = np.percentile(col, [0.5, 99.5])
        if not hi > lo:  # a (nearly) constant feature still gets a usable range
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        counts, _ = np.histogram(np.clip(col, lo, hi), bins=edges)
        stats[name] = {
            "mean": float(means[i]),
            "std": float(stds[i]),
            "edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
        }
    return stats


def fraud_metadata(
    *,
    training_data: Mapping,
    params: Mapping,
    metrics: Mapping,
    reference: Mapping,
    parent_version: int | None = None,
) -> dict:
    """The metadata.json of a fraud version (created_at, framework, git_sha and feature names filled in).

    The server standardizes with `reference`'s mean and std in `feature_names` order.
    """
    return version_metadata(
        training_data=training_data,
        params=params,
        metrics=metrics,
        parent_version=parent_version,
        feature_names=list(FRAUD_FEATURES),
        reference_stats=dict(reference),
    )


def bootstrap(
    repository: str,
    *,
    rows: int = 40_000,
    epochs: int = 10,
    seed: int = 0,
    if_empty: bool = False,
    params: TrainParams | None = None,
    num_threads: int = 2,
    log: Callable[[str], None] = print,
) -> int | None:
    """Train the fraud model on `rows` generated rows and publish it; return the new version.

    With `if_empty`, returns None without training when the repository already holds a model.
    `params` overrides every hyper-parameter (then `epochs` is ignored). Sets torch's
    intra-op threads to `num_threads` for the process. The metrics recorded are
    the exported file's on holdout rows standardized and clipped as the server does.
    """
    repo = ModelRepository(repository)
    if if_empty and _holds_models(repo, log):
        return None
    started = time.perf_counter()
    torch.set_num_threads(num_threads)
    params = params or TrainParams(epochs=epochs)
    x, y = make_fraud(rows, seed=seed)
    x_train, y_train, x_hold, y_hold = split_holdout(x, y, params.holdout_fraction)
    model = fit_fraud(x_train, y_train, params, seed=seed, log=log)
    reference = reference_stats(x_train, FRAUD_FEATURES)
    model_file = export_torchscript(model.for_serving())
    served = {"feature_names": list(FRAUD_FEATURES), "reference_stats": reference}  # what the server reads
    metrics = score_file(model_file, served, x_hold, y_hold)
    clipped = np.abs(standardize(x_hold, served, math.inf)) > FRAUD_CLIP
    training_data = {
        "generator": _GENERATOR,
        "seed": seed,
        "rows": int(rows),
        "scenario": "baseline",
        "train_rows": int(len(x_train)),
        "holdout_rows": int(len(x_hold)),
        "split": "first train_rows rows train, the rest is the holdout",
        "sha256": arrays_sha256(x_train, y_train),
    }
    run_params = {
        **asdict(params),
        "seed": seed,
        "num_threads": num_threads,
        "optimizer": "adam",
        "loss": "bce_with_logits(pos_weight=neg/pos)",
        "logit_offset": float(model.logit_offset),
    }
    metadata = fraud_metadata(
        training_data=training_data,
        params=run_params,
        metrics={
            **metrics,
            "holdout_rows": int(len(y_hold)),
            "holdout_positives": int(y_hold.sum()),
            "holdout_clipped_rows": int(clipped.any(axis=1).sum()),  # rows with a z-score beyond ±FRAUD_CLIP
        },
        reference=reference,
    )
    metadata["monitoring"] = fraud_monitoring(model_file, served, x_train, x_hold, y_hold, FRAUD_CLIP)
    version = repo.publish(FRAUD_MODEL, {"model.pt": model_file}, metadata, config=fraud_config())
    auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}"
    log(
        f"published {FRAUD_MODEL} version {version} at {repo.version(FRAUD_MODEL, version).path}: "
        f"holdout loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}, roc_auc {auc} "
        f"({len(x_train)} train rows, {params.epochs} epochs, {time.perf_counter() - started:.1f} s)"
    )
    return version


def _holds_models(repo: ModelRepository, log: Callable[[str], None]) -> bool:
    if repo.is_empty():
        return False
    log(f"repository {repo.root_uri} already holds models ({', '.join(repo.list_models())}); nothing to do")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="repository root: a local path or a pyarrow.fs URI")
    parser.add_argument("--if-empty", action="store_true", help="do nothing when the repository already holds models")
    parser.add_argument("--rows", type=int, default=40_000, help="fraud: generated rows, holdout included")
    parser.add_argument("--epochs", type=int, default=TrainParams.epochs, help="fraud: training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of both models' data and training")
    parser.add_argument("--trainer", choices=["ray", "plain"], default="ray",
                        help="fraud: ray = write the example parquet data and run training.retrain on a local Ray "
                        "(the job path, one worker); plain = this module's single-process PyTorch loop")
    parser.add_argument("--data-dir", help="with --trainer ray: the data folder (default $FLEET_DATA_DIR, else ./data)")
    args = parser.parse_args(argv)
    if args.rows < 100 or args.epochs < 1:
        parser.error(f"need --rows >= 100 and --epochs >= 1, got {args.rows} and {args.epochs}")
    if args.if_empty and _holds_models(ModelRepository(args.repository), print):
        return 0
    if args.trainer == "plain":
        bootstrap(args.repository, rows=args.rows, epochs=args.epochs, seed=args.seed)
    elif _bootstrap_with_ray(args) != 0:
        return 1
    bootstrap_digits(args.repository, seed=args.seed)
    return 0


def _bootstrap_with_ray(args: argparse.Namespace) -> int:
    """fraud through the job path: example parquet data, then `training.retrain` on a local Ray, one worker."""
    import os

    import ray

    from training import retrain
    from training.data import data_dir, ensure_example_data

    root = data_dir(args.data_dir)
    path = ensure_example_data(root, FRAUD_MODEL, rows=args.rows, seed=args.seed)
    print(f"example data: {path}", flush=True)
    repository = os.path.abspath(args.repository) if "://" not in args.repository else args.repository
    # Checkpoints beside the data on a local disk; with the data on an object store, retrain's default folder.
    storage = [] if "://" in root else ["--storage-path", os.path.join(root, "checkpoints")]
    try:
        return retrain.main(["--model", FRAUD_MODEL, "--repository", repository, "--data-dir", root,
                             "--num-workers", "1", "--cpus-per-worker", "1", "--epochs", str(args.epochs),
                             "--seed", str(args.seed), "--no-traffic", "--use-gpu", "no", *storage])
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
