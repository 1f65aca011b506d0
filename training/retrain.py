"""Retrain a model as a Ray job: Ray Data reads parquet, a TorchTrainer trains, the best checkpoint is published.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m training.retrain --model fraud --num-workers 2 --epochs 5

Steps: read the example data and the logged traffic (training.data); split
rows by hash into train / validation / holdout; train with
`TorchTrainer(ScalingConfig(num_workers, use_gpu=auto))`, a checkpoint per
epoch (`CheckpointConfig(num_to_keep, checkpoint_score_attribute="val_loss")`)
and `FailureConfig(max_failures)` so a killed worker resumes from the last
checkpoint; take the best checkpoint, export TorchScript, score it and the
serving version on the holdout, and publish (training.publish): accepted, or
`"gate": "rejected"` and not served.

The repository is the one the cluster serves from (`--repository`, else
FLEET_REPOSITORY which `fleet up` gives its jobs), never a path in the job's
copy of the working dir.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from serving.registry import ModelRepository
from training.bootstrap import TrainParams, reference_stats
from training.data import DataSources, data_dir, find_sources, read_fraud, split_fraud, to_numpy
from training.datasets import FRAUD_FEATURES
from training.preprocess_reference import feature_stats
from training.publish import DEFAULT_TOLERANCE, publish_candidate, resolve_repository

__all__ = ["Prepared", "prepare", "worker_config", "make_trainer", "publish_best", "add_common_flags", "JobStart",
           "start_job", "main"]

MODELS = ("fraud",)
STORAGE_ENV = "FLEET_TRAIN_STORAGE"


@dataclass
class Prepared:
    """What every trainer of one run shares: the datasets, the training statistics and the holdout."""

    sources: DataSources
    datasets: dict  # name -> materialized Ray Dataset
    mean: np.ndarray
    std: np.ndarray
    pos_weight: float
    reference: dict
    holdout: tuple[np.ndarray, np.ndarray]
    rows: dict

    def training_data(self) -> dict:
        return {**self.sources.describe(), "rows": self.rows, "split": "hash of each row's features: "
                "buckets 0-19 holdout, 20-29 validation, 30-99 train (training.data.split_buckets)"}


def prepare(model: str, root: Path, *, include_traffic: bool = True, log=print) -> Prepared:
    """Read and split the model's data with Ray Data; statistics of the training rows on the driver."""
    if model not in MODELS:
        raise SystemExit(f"--model {model!r}: retraining supports {', '.join(MODELS)}")
    sources = find_sources(root, model, include_traffic=include_traffic)
    _warn_if_short_of_cpu(log)
    log(f"data: {len(sources.example)} example file(s) and {len(sources.traffic)} traffic file(s) under {root}")
    datasets = split_fraud(read_fraud(sources))
    x_train, y_train = to_numpy(datasets["train"])
    holdout = to_numpy(datasets["holdout"])
    positives = int(y_train.sum())
    if positives == 0 or positives == len(y_train):
        raise SystemExit(f"the training rows need both classes; got {positives} positives in {len(y_train)} rows")
    mean, std = feature_stats(x_train)
    rows = {"train": int(len(y_train)), "validation": int(datasets["validation"].count()),
            "holdout": int(len(holdout[1])), "train_positives": positives}
    rows["total"] = rows["train"] + rows["validation"] + rows["holdout"]
    log(f"rows: {rows['train']} train, {rows['validation']} validation, {rows['holdout']} holdout "
        f"({positives} fraud in train)")
    return Prepared(sources, datasets, mean, std, (len(y_train) - positives) / positives,
                    reference_stats(x_train, FRAUD_FEATURES), holdout, rows)


def _warn_if_short_of_cpu(log) -> None:
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if free < 1.0:
        log(f"note: the cluster has {free:.2f} logical CPUs free; Ray Data's file listing task asks for 1, so "
            "reading waits until one is free (serving replicas and other jobs hold the rest)")


def worker_config(prepared: Prepared, params: TrainParams, *, seed: int, threads: int = 1,
                  fail_at_epoch: int | None = None, fault_marker: str | None = None) -> dict:
    """`train_loop_config` of the fraud TorchTrainer."""
    return {**asdict(params), "seed": seed, "threads": threads, "mean": prepared.mean.tolist(),
            "std": prepared.std.tolist(), "pos_weight": prepared.pos_weight,
            "fail_at_epoch": fail_at_epoch, "fault_marker": fault_marker}


def make_trainer(prepared: Prepared, config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                 run_config):
    """A TorchTrainer of `training.train_loop.train_fraud_worker` over the prepared train/validation sets."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.train_loop import train_fraud_worker

    return TorchTrainer(
        train_fraud_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        datasets={"train": prepared.datasets["train"], "validation": prepared.datasets["validation"]},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker validates on all of it
        run_config=run_config,
    )


def publish_best(prepared: Prepared, checkpoint, config: dict, repo: ModelRepository, model: str, *,
                 params: dict, training: dict, tolerance: float, log=print) -> tuple[int, dict]:
    """Load the checkpoint's model, calibrate and export it, then gate and publish it."""
    from training.artifacts import export_torchscript
    from training.train_loop import load_checkpoint_model

    net, info = load_checkpoint_model(checkpoint, config)
    net.logit_offset.fill_(-math.log(prepared.pos_weight))
    model_file = export_torchscript(net.for_serving())
    training = {**training, "best_epoch": info["epoch"] + 1, "best_val_loss": info["val_loss"],
                "checkpoint": checkpoint.path, "logit_offset": float(net.logit_offset)}
    return publish_candidate(repo, model, model_file, holdout=prepared.holdout, reference=prepared.reference,
                             training_data=prepared.training_data(), params=params, training=training,
                             tolerance=tolerance, log=log)


def use_gpu_flag(value: str) -> bool:
    """--use-gpu auto|yes|no: auto uses GPUs when the cluster has any."""
    import ray

    if value == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return value == "yes"


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Flags retrain and tune share: model, where things are, resources, the gate."""
    p.add_argument("--model", required=True, choices=MODELS, help="which example model to train")
    p.add_argument("--publish-as", help="model name to publish under (default: --model)")
    p.add_argument("--repository", help=f"repository root: absolute path or URI (default: ${'{'}FLEET_REPOSITORY{'}'})")
    p.add_argument("--data-dir", help="data folder (default: $FLEET_DATA_DIR, else ./data)")
    p.add_argument("--no-traffic", action="store_true", help="leave out the logged traffic under <data>/traffic")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (per trial for tune)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="logical CPUs each worker reserves")
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--storage-path", help=f"where checkpoints go (default: ${STORAGE_ENV}, else ~/ray_results)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="the candidate is rejected if its holdout ROC AUC is this much below the serving version's")
    p.add_argument("--seed", type=int, default=0)


def quiet_train_logs() -> None:
    """Workers' prints once, not twice (Train's print patch would log each line again)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def storage_path(flag: str | None) -> str:
    return str(Path(flag or os.environ.get(STORAGE_ENV) or "~/ray_results").expanduser().resolve())


@dataclass
class JobStart:
    """What every training job begins with: where to publish, under which name, the data, where checkpoints go."""

    repo: ModelRepository
    model: str
    prepared: Prepared
    storage: str
    name: str  # of the run (its checkpoint folder)
    started: float  # perf_counter


def start_job(args: argparse.Namespace, kind: str) -> JobStart:
    """Resolve the repository, connect to Ray (the cluster of a submitted job) and prepare the data."""
    import ray

    repo = ModelRepository(resolve_repository(args.repository))
    model = args.publish_as or args.model
    started = time.perf_counter()
    quiet_train_logs()
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    prepared = prepare(args.model, data_dir(args.data_dir), include_traffic=not args.no_traffic)
    name = f"{kind}-{model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return JobStart(repo, model, prepared, storage_path(args.storage_path), name, started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    defaults = TrainParams()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="CheckpointConfig(num_to_keep)")
    parser.add_argument("--fail-at-epoch", type=int, help="fault injection: a worker exits hard at this epoch, once")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.num_workers < 1 or args.batch_size < 1:
        parser.error("--epochs, --num-workers and --batch-size must be >= 1")
    if args.fail_at_epoch is not None and not 1 <= args.fail_at_epoch <= args.epochs:
        parser.error(f"--fail-at-epoch must lie in 1..{args.epochs}")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    job = start_job(args, "retrain")
    repo, model, prepared, storage, name, started = (job.repo, job.model, job.prepared, job.storage, job.name,
                                                     job.started)
    params = replace(defaults, hidden=args.hidden, depth=args.depth, dropout=args.dropout, lr=args.lr,
                     weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs)
    fault = str(Path(storage) / name / "fault-injected") if args.fail_at_epoch else None
    config = worker_config(prepared, params, seed=args.seed,
                           fail_at_epoch=None if args.fail_at_epoch is None else args.fail_at_epoch - 1,
                           fault_marker=fault)
    use_gpu = use_gpu_flag(args.use_gpu)
    print(f"training {model}: {args.num_workers} worker(s){' on GPU' if use_gpu else ''}, {args.epochs} epoch(s); "
          f"checkpoints in {storage}/{name}", flush=True)
    run_config = RunConfig(
        name=name, storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=args.keep_checkpoints, checkpoint_score_attribute="val_loss",
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=args.max_failures),
    )
    trainer = make_trainer(prepared, config, num_workers=args.num_workers, use_gpu=use_gpu,
                           cpus_per_worker=args.cpus_per_worker, run_config=run_config)
    result = trainer.fit()
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    best = result.get_best_checkpoint("val_loss", "min")
    if best is None:
        print("training reported no checkpoint", file=sys.stderr)
        return 1
    record = {"num_workers": args.num_workers, "use_gpu": use_gpu, "epochs": args.epochs,
              "max_failures": args.max_failures, "run": f"{storage}/{name}",
              "fault_injected": bool(fault and Path(fault).exists()),
              "duration_s": round(time.perf_counter() - started, 1)}
    run_params = {**asdict(params), "seed": args.seed, "optimizer": "adam",
                  "loss": "bce_with_logits(pos_weight=neg/pos)", "trainer": "ray.train.torch.TorchTrainer"}
    run_params.pop("holdout_fraction")
    publish_best(prepared, best, config, repo, model, params=run_params, training=record,
                 tolerance=args.tolerance)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
