"""Retrain a model as a Ray job: its data is read and split, a TorchTrainer trains, the best checkpoint is published.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m training.retrain --model fraud --num-workers 2 --epochs 5

Steps (fraud here; `--model digits` runs `training.digits_job`, the same steps
over images): read the example data and the served model's logged traffic
joined with its labels (training.data, training.traffic); split rows by hash
into train / validation / holdout; weight traffic rows so they carry at least
`--traffic-weight` of the loss; train with `TorchTrainer(ScalingConfig(
num_workers, use_gpu=auto))`, a checkpoint per epoch (`CheckpointConfig(
num_to_keep, checkpoint_score_attribute="val_loss")`) and
`FailureConfig(max_failures)` so a killed worker resumes from the last
checkpoint; take the best checkpoint, export TorchScript, score it and the
serving version on the holdouts (the traffic holdout decides when it is big
enough), and publish (training.publish): accepted, or `"gate": "rejected"` and
not served.

The served model is `--publish-as` when given, else `--model`: its traffic and
labels are the ones read. The repository is the one the cluster serves from
(`--repository`, else FLEET_REPOSITORY which `fleet up` gives its jobs), never
a path in the job's copy of the working dir.
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
from serving.storage import is_uri
from training.bootstrap import TrainParams, reference_stats
from training.data import (DEFAULT_TRAFFIC_SHARE, DataSources, SplitRows, check_example_files, data_dir,
                           find_sources, fraud_traffic, newest_rows, read_fraud, source_weights,
                           split_fraud, to_numpy)
from training.datasets import FRAUD_FEATURES
from training.preprocess_reference import feature_stats
from training.priority import lower_priority
from training.publish import DEFAULT_MIN_TRAFFIC_HOLDOUT, DEFAULT_TOLERANCE, publish_candidate, resolve_repository
from training.traffic import DEFAULT_LABEL_WINDOW_DAYS, summarize

__all__ = ["MODELS", "Prepared", "prepare", "worker_config", "make_trainer", "trainer_kwargs", "publish_best",
           "add_common_flags", "check_common_flags", "use_gpu_flag", "JobStart", "start_job", "run_config", "fit_best",
           "main"]

MODELS = ("fraud", "digits")
STORAGE_ENV = "FLEET_TRAIN_STORAGE"
REFERENCE_ROWS = 10_000  # the newest labelled traffic rows a retrained version's drift reference is made of ...
MIN_REFERENCE_ROWS = 2_000  # ... when there are at least this many (else: its training rows)


@dataclass
class Prepared:
    """What every trainer of one run shares: the datasets, the training statistics and the holdouts."""

    sources: DataSources
    datasets: dict  # name -> materialized Ray Dataset
    mean: np.ndarray
    std: np.ndarray
    pos_weight: float
    row_weights: tuple[float, float]  # (example row, traffic row)
    reference: dict
    train: SplitRows
    holdout: SplitRows
    rows: dict
    traffic: dict  # training.traffic's report
    # The rows the version's drift reference describes: the newest labelled traffic when there is enough of it
    # (what the version will serve after a drift), else None: the training rows.
    recent: tuple[np.ndarray, np.ndarray] | None = None

    def training_data(self) -> dict:
        source = ({"from": "the newest labelled traffic", "rows": int(len(self.recent[1]))} if self.recent is not None
                  else {"from": "the training rows", "rows": self.rows["train"]})
        return {**self.sources.describe(), "rows": self.rows, "traffic": self.traffic, "drift_reference": source,
                "row_weights": {"example": self.row_weights[0], "traffic": self.row_weights[1]},
                "split": "hash of each row's features: buckets 0-19 holdout, 20-29 validation, 30-99 train "
                         "(training.data.split_buckets), for example and traffic rows alike"}


def prepare(model: str, root: str | Path, *, served: str | None = None, include_traffic: bool = True,
            window_days: float = DEFAULT_LABEL_WINDOW_DAYS, traffic_share: float = DEFAULT_TRAFFIC_SHARE,
            reference_rows: int = REFERENCE_ROWS, log=print) -> Prepared:
    """Read the example data (Ray Data) and `served`'s labelled traffic (pyarrow), split, weigh; stats on the driver."""
    if model != "fraud":
        raise SystemExit(f"--model {model!r}: this path trains fraud")
    sources = find_sources(root, model)
    check_example_files(sources.example, [*FRAUD_FEATURES, "label"], sources.filesystem)
    joined, traffic_rows, report, recent = None, None, {"included": False}, None
    if include_traffic:
        joined, x_t, y_t = fraud_traffic(root, served or model, window_days=window_days)
        traffic_rows, report = (x_t, y_t), joined.report
        if reference_rows and len(y_t) >= min(reference_rows, MIN_REFERENCE_ROWS):
            recent = newest_rows(joined, x_t, y_t, reference_rows)
    for line in summarize(report):
        log(line)
    sources = find_sources(root, model, joined) if joined is not None else sources
    _warn_if_short_of_cpu(log)
    log(f"data: {len(sources.example)} example file(s), {len(sources.traffic)} traffic and {len(sources.labels)} "
        f"label file(s) under {root}")
    datasets = split_fraud(read_fraud(sources, traffic_rows))
    train, holdout = to_numpy(datasets["train"]), to_numpy(datasets["holdout"])
    weights = source_weights(int((~train.traffic).sum()), int(train.traffic.sum()), traffic_share)
    w = np.where(train.traffic, weights[1], weights[0])
    positives, negatives = float(np.sum(w * (train.y == 1))), float(np.sum(w * (train.y != 1)))
    if positives <= 0 or negatives <= 0:
        raise SystemExit(f"the training rows need both classes; got {int(train.y.sum())} positives in "
                         f"{len(train.y)} rows")
    mean, std = feature_stats(train.x)
    validation = to_numpy(datasets["validation"])
    rows = {"train": int(len(train.y)), "validation": int(len(validation.y)), "holdout": int(len(holdout.y)),
            "train_positives": int(train.y.sum())}
    rows["total"] = rows["train"] + rows["validation"] + rows["holdout"]
    for name, split in (("example", False), ("traffic", True)):
        rows[name] = {part: int(np.sum(s.traffic == split)) for part, s in
                      (("train", train), ("validation", validation), ("holdout", holdout))}
    log(f"rows: {rows['train']} train, {rows['validation']} validation, {rows['holdout']} holdout "
        f"({rows['train_positives']} fraud in train; traffic {rows['traffic']['train']} train, "
        f"{rows['traffic']['holdout']} holdout; row weights: example {weights[0]:.3g}, traffic {weights[1]:.3g})")
    reference = reference_stats(train.x, FRAUD_FEATURES)
    if recent is not None:
        # The drift reference (each feature's histogram) of the newest labelled traffic: after a drift that is the
        # world this version is trained for and will serve. Its standardization stays that of its training rows.
        newest = reference_stats(recent[0], FRAUD_FEATURES)
        reference = {name: {**stats, "edges": newest[name]["edges"], "counts": newest[name]["counts"]}
                     for name, stats in reference.items()}
        log(f"drift reference: the newest {len(recent[1])} labelled traffic rows")
    return Prepared(sources, datasets, mean, std, negatives / positives, weights, reference, train, holdout, rows,
                    report, recent)


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
            "std": prepared.std.tolist(), "pos_weight": prepared.pos_weight, "row_weights": list(prepared.row_weights),
            "fail_at_epoch": fail_at_epoch, "fault_marker": fault_marker}


def make_trainer(prepared: Prepared, config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                 run_config):
    """A TorchTrainer of `training.train_loop.train_fraud_worker` over the prepared train/validation sets."""
    from ray.train.torch import TorchTrainer

    from training.train_loop import train_fraud_worker

    return TorchTrainer(train_fraud_worker, train_loop_config=config, **trainer_kwargs(
        prepared.datasets, num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
        run_config=run_config))


def trainer_kwargs(datasets: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: float, run_config) -> dict:
    """ScalingConfig, the train/validation datasets (train split across workers) and the RunConfig of a trainer."""
    from ray.train import DataConfig, ScalingConfig

    return {"scaling_config": ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={
                "CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            "datasets": {"train": datasets["train"], "validation": datasets["validation"]},
            "dataset_config": DataConfig(datasets_to_split=["train"]),  # every worker validates on all of it
            "run_config": run_config}


def publish_best(prepared: Prepared, checkpoint, config: dict, repo: ModelRepository, model: str, *,
                 params: dict, training: dict, tolerance: float,
                 min_traffic_holdout: int = DEFAULT_MIN_TRAFFIC_HOLDOUT, log=print) -> tuple[int, dict]:
    """Load the checkpoint's model, calibrate and export it, then gate and publish it."""
    from training.artifacts import export_torchscript
    from training.train_loop import load_checkpoint_model

    net, info = load_checkpoint_model(checkpoint, config)
    net.logit_offset.fill_(-math.log(prepared.pos_weight))
    model_file = export_torchscript(net.for_serving())
    training = {**training, "best_epoch": info["epoch"] + 1, "best_val_loss": info["val_loss"],
                "checkpoint": checkpoint.path, "logit_offset": float(net.logit_offset)}
    traffic_holdout = prepared.holdout.part(from_traffic=True)
    return publish_candidate(repo, model, model_file, holdout=prepared.holdout.part(from_traffic=False),
                             traffic_holdout=traffic_holdout if len(traffic_holdout[1]) else None,
                             reference=prepared.reference, training_data=prepared.training_data(), params=params,
                             training=training, x_train=prepared.train.x, tolerance=tolerance,
                             min_traffic_holdout=min_traffic_holdout, monitoring_rows=prepared.recent, log=log)


def use_gpu_flag(value: str) -> bool:
    """--use-gpu auto|yes|no: auto uses GPUs when the cluster has any."""
    import ray

    if value == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return value == "yes"


def add_common_flags(p: argparse.ArgumentParser, models: tuple[str, ...] = MODELS) -> None:
    """Flags retrain and tune share: model, where things are, the traffic, resources, the gate."""
    p.add_argument("--model", required=True, choices=models, help="which example model to train")
    p.add_argument("--publish-as", help="the served model to publish under and read the traffic of (default: --model)")
    p.add_argument("--repository", help=f"repository root: absolute path or URI (default: ${'{'}FLEET_REPOSITORY{'}'})")
    p.add_argument("--data-dir", help="data folder (default: $FLEET_DATA_DIR, else ./data)")
    p.add_argument("--no-traffic", action="store_true", help="leave out the logged traffic and its labels")
    p.add_argument("--label-window-days", type=float, default=DEFAULT_LABEL_WINDOW_DAYS,
                   help="a prediction trains only with a label received this many days from it")
    p.add_argument("--reference-rows", type=int, default=REFERENCE_ROWS,
                   help="the drift reference of the new version: the newest this many labelled traffic rows (when "
                   f"there are at least {MIN_REFERENCE_ROWS}, or all of them if fewer are asked), else its "
                   "training rows; 0: always the training rows")
    p.add_argument("--traffic-weight", type=float, default=DEFAULT_TRAFFIC_SHARE,
                   help="the least share of the training loss labelled traffic rows carry (0..1) when there are any")
    p.add_argument("--min-traffic-holdout", type=int, default=DEFAULT_MIN_TRAFFIC_HOLDOUT,
                   help="labelled traffic rows the holdout needs before it, not the example holdout, decides the gate")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (per trial for tune)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="logical CPUs each worker reserves")
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--storage-path", help=f"where checkpoints go (default: ${STORAGE_ENV}, else ~/ray_results)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="the candidate is rejected if its holdout ROC AUC (digits: accuracy) is this much below "
                   "the serving version's")
    p.add_argument("--seed", type=int, default=0)


def check_common_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.traffic_weight <= 1.0:
        parser.error(f"--traffic-weight must lie in [0, 1], got {args.traffic_weight}")
    if not args.label_window_days > 0 or args.min_traffic_holdout < 1 or args.num_workers < 1:
        parser.error("--label-window-days must be > 0, --min-traffic-holdout and --num-workers >= 1")


def quiet_train_logs() -> None:
    """Workers' prints once, not twice (Train's print patch would log each line again)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def storage_path(flag: str | None) -> str:
    """Where checkpoints go: a local folder made absolute, or a URI Ray Train writes to (s3://bucket/checkpoints)."""
    where = flag or os.environ.get(STORAGE_ENV) or "~/ray_results"
    return where if is_uri(where) else str(Path(where).expanduser().resolve())


@dataclass
class JobStart:
    """What every training job begins with: where to publish, under which name, where checkpoints go."""

    repo: ModelRepository
    model: str  # the served model: published under, its traffic read
    root: str  # the data folder: an absolute path or a URI
    storage: str
    name: str  # of the run (its checkpoint folder)
    started: float  # perf_counter


def start_job(args: argparse.Namespace, kind: str) -> JobStart:
    """Resolve the repository and the data folder, connect to Ray (the cluster of a submitted job), take the CPU
    priority the submitter set (training/priority.py)."""
    import ray

    repo = ModelRepository(resolve_repository(args.repository))
    model = args.publish_as or args.model
    started = time.perf_counter()
    quiet_train_logs()
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    nice = lower_priority()  # the driver; the job's other processes by its setup hook (cluster.jobs)
    if nice > 0:
        print(f"CPU priority: nice {nice}, below the serving replicas (train_nice)", flush=True)
    name = f"{kind}-{model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return JobStart(repo, model, data_dir(args.data_dir), storage_path(args.storage_path), name, started)


def run_config(job: JobStart, *, keep_checkpoints: int, max_failures: int):
    """A checkpoint per epoch, the best `keep_checkpoints` by validation loss kept; `max_failures` group restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=job.name, storage_path=job.storage,
        checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute="val_loss",
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=max_failures),
    )


def fit_best(trainer):
    """`trainer.fit()` and its best checkpoint by validation loss, or None (said on stderr)."""
    result = trainer.fit()
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return None
    best = result.get_best_checkpoint("val_loss", "min")
    if best is None:
        print("training reported no checkpoint", file=sys.stderr)
    return best


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    parser.add_argument("--epochs", type=int, help="default: fraud 5, digits 15")
    parser.add_argument("--lr", type=float, help="Adam's learning rate (default: the model's)")
    parser.add_argument("--hidden", type=int, help="hidden width (default: the model's)")
    parser.add_argument("--depth", type=int, help="fraud: hidden layers")
    parser.add_argument("--dropout", type=float, help="fraud: dropout")
    parser.add_argument("--batch-size", type=int, help="rows per step and worker (default: the model's)")
    parser.add_argument("--weight-decay", type=float, help="Adam's weight decay (default: the model's)")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="CheckpointConfig(num_to_keep)")
    parser.add_argument("--fail-at-epoch", type=int, help="fault injection: a worker exits hard at this epoch, once")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_common_flags(parser, args)
    args.epochs = args.epochs or (5 if args.model == "fraud" else 15)
    if args.epochs < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--epochs and --batch-size must be >= 1")
    if args.fail_at_epoch is not None and not 1 <= args.fail_at_epoch <= args.epochs:
        parser.error(f"--fail-at-epoch must lie in 1..{args.epochs}")
    if args.model == "digits":
        if args.depth is not None or args.dropout is not None:
            parser.error("--depth and --dropout are fraud's; digits takes --hidden, --lr, --batch-size, "
                         "--weight-decay and --epochs")
        from training.digits_job import run_digits

        return run_digits(args, start_job(args, "retrain"))
    job = start_job(args, "retrain")
    prepared = prepare(args.model, job.root, served=job.model, include_traffic=not args.no_traffic,
                       window_days=args.label_window_days, traffic_share=args.traffic_weight,
                       reference_rows=args.reference_rows)
    given = {k: getattr(args, k) for k in ("hidden", "depth", "dropout", "lr", "weight_decay", "batch_size")}
    params = replace(TrainParams(), epochs=args.epochs, **{k: v for k, v in given.items() if v is not None})
    fault = str(Path(job.storage) / job.name / "fault-injected") if args.fail_at_epoch else None
    config = worker_config(prepared, params, seed=args.seed,
                           fail_at_epoch=None if args.fail_at_epoch is None else args.fail_at_epoch - 1,
                           fault_marker=fault)
    use_gpu = use_gpu_flag(args.use_gpu)
    print(f"training {job.model}: {args.num_workers} worker(s){' on GPU' if use_gpu else ''}, {args.epochs} "
          f"epoch(s); checkpoints in {job.storage}/{job.name}", flush=True)
    trainer = make_trainer(prepared, config, num_workers=args.num_workers, use_gpu=use_gpu,
                           cpus_per_worker=args.cpus_per_worker,
                           run_config=run_config(job, keep_checkpoints=args.keep_checkpoints,
                                                 max_failures=args.max_failures))
    best = fit_best(trainer)
    if best is None:
        return 1
    record = {"num_workers": args.num_workers, "use_gpu": use_gpu, "epochs": args.epochs,
              "max_failures": args.max_failures, "run": f"{job.storage}/{job.name}",
              "fault_injected": bool(fault and Path(fault).exists()),
              "duration_s": round(time.perf_counter() - job.started, 1)}
    run_params = {**asdict(params), "seed": args.seed, "optimizer": "adam", "traffic_weight": args.traffic_weight,
                  "label_window_days": args.label_window_days,
                  "loss": "mean(row weight * bce_with_logits(pos_weight=weighted neg/pos))",
                  "trainer": "ray.train.torch.TorchTrainer"}
    run_params.pop("holdout_fraction")
    publish_best(prepared, best, config, job.repo, job.model, params=run_params, training=record,
                 tolerance=args.tolerance, min_traffic_holdout=args.min_traffic_holdout)
    print(f"done in {time.perf_counter() - job.started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
