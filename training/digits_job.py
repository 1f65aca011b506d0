"""Retrain digits as a Ray job: `python -m training.retrain --model digits` (and `fleet train digits`).

The same steps as fraud's job, over images: the example digits plus the served
model's logged traffic images (logged in full) joined with their labels
(training.digits_data), a `TorchTrainer` of `training.digits_loop` (a
checkpoint per epoch, `FailureConfig`), then the best checkpoint exported and
judged against the version now serving on held-out accuracy: on the traffic
holdout when it has `--min-traffic-holdout` rows, else on the example holdout.
Published accepted or `"gate": "rejected"`, with metadata like fraud's
(monitoring reference included, without PCA: digits has no tabular input).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace


from serving.errors import FleetError
from serving.registry import ModelRepository
from training.artifacts import export_torchscript, load_torchscript, version_metadata
from training.data import source_weights
from training.digits import DIGITS_MEAN, DIGITS_SIZE, DIGITS_STD, DigitsParams, digits_config, evaluate_digits
from training.digits_data import DigitsRows, DigitsSplit, digits_rows, to_ray_dataset
from training.publish import finite, gate, log_verdict, pick_holdout, ray_job_id, read_bytes, serving_version
from training.reference import digits_monitoring
from training.traffic import summarize

__all__ = ["DigitsPrepared", "prepare_digits", "check_preprocessing", "digits_worker_config", "publish_digits",
           "run_digits"]


@dataclass
class DigitsPrepared:
    """What the digits trainer and the gate share: the rows, their Ray datasets and the row weights."""

    rows: DigitsRows
    datasets: dict
    row_weights: tuple[float, float]

    def counts(self) -> dict:
        out = {}
        for name, split in (("train", self.rows.train), ("validation", self.rows.validation),
                            ("holdout", self.rows.holdout)):
            out[name] = int(len(split.y))
            out[f"{name}_traffic"] = int(split.traffic.sum())
        out["total"] = out["train"] + out["validation"] + out["holdout"]
        return out

    def training_data(self) -> dict:
        return {**self.rows.sources.describe(), "rows": self.counts(), "traffic": self.rows.traffic_report,
                "row_weights": {"example": self.row_weights[0], "traffic": self.row_weights[1]},
                "split": "example rows: the file's 'split' column for the holdout, then the hash of the normalised "
                         "pixels (buckets 20-29 validation); traffic rows: that hash, buckets 0-19 holdout, 20-29 "
                         "validation, 30-99 train (training.data.split_buckets)"}


def check_preprocessing(repo: ModelRepository, model: str) -> None:
    """SystemExit unless an existing `model` resizes to 8 x 8 and normalises as DigitsCNN is trained (its config)."""
    if model not in repo.list_models():
        return
    params = repo.spec(model).parameters
    got = {k: params.get(k) for k in ("preprocess", "preprocess.size", "preprocess.mean", "preprocess.std")}
    expected = {"preprocess": "image", "preprocess.size": ",".join(map(str, DIGITS_SIZE)),
                "preprocess.mean": f"{DIGITS_MEAN:g}", "preprocess.std": f"{DIGITS_STD:g}"}
    if got != expected:
        raise SystemExit(f"model {model!r} preprocesses its images as {got}; the digits job trains for {expected}")


def prepare_digits(root, served: str, *, include_traffic: bool, window_days: float, traffic_share: float,
                   log=print) -> DigitsPrepared:
    """Read, normalise and split the rows (driver), weigh them, and make the train/validation Ray datasets."""
    rows = digits_rows(root, served, include_traffic=include_traffic, window_days=window_days)
    for line in summarize(rows.traffic_report):
        log(line)
    weights = source_weights(int((~rows.train.traffic).sum()), int(rows.train.traffic.sum()), traffic_share)
    prepared = DigitsPrepared(rows, {"train": to_ray_dataset(rows.train),
                                     "validation": to_ray_dataset(rows.validation)}, weights)
    c = prepared.counts()
    log(f"rows: {c['train']} train, {c['validation']} validation, {c['holdout']} holdout images (traffic: "
        f"{c['train_traffic']} train, {c['holdout_traffic']} holdout; row weights: example {weights[0]:.3g}, "
        f"traffic {weights[1]:.3g})")
    if c["train"] == 0 or c["validation"] == 0:
        raise SystemExit("no digits to train or validate on: the example data is empty")
    return prepared


def digits_worker_config(prepared: DigitsPrepared, params: DigitsParams, *, seed: int, threads: int = 1,
                         fail_at_epoch: int | None = None, fault_marker: str | None = None) -> dict:
    """`train_loop_config` of the digits TorchTrainer."""
    return {**asdict(params), "channels": list(params.channels), "seed": seed, "threads": threads,
            "row_weights": list(prepared.row_weights), "fail_at_epoch": fail_at_epoch, "fault_marker": fault_marker}


def _score_holdouts(repo: ModelRepository, model: str, model_file: bytes, parent: int | None, holdout: DigitsSplit,
                    log) -> dict:
    candidate = load_torchscript(model_file)
    serving = None
    if parent is not None:
        try:
            serving = load_torchscript(read_bytes(repo.model_file(model, parent)))
        except (FleetError, OSError, RuntimeError, ValueError) as exc:
            log(f"could not load the serving version {parent} ({exc}); judging without it")
    out = {}
    for name, from_traffic in (("example", False), ("traffic", True)):
        x, y = holdout.part(from_traffic)
        if len(y) == 0:
            continue
        entry = {"rows": int(len(y)), "candidate": evaluate_digits(candidate, x, y), "serving": None}
        if serving is not None:
            try:
                entry["serving"] = evaluate_digits(serving, x, y)
            except RuntimeError as exc:  # a version with another input shape
                log(f"could not score the serving version {parent} on the {name} holdout ({exc})")
        out[name] = entry
    return out


def publish_digits(repo: ModelRepository, model: str, model_file: bytes, prepared: DigitsPrepared, *, params: dict,
                   training: dict, tolerance: float, min_traffic_holdout: int, log=print) -> tuple[int, dict]:
    """Score the candidate and the serving version on the holdouts, gate on accuracy, publish; (version, metadata)."""
    holdout = prepared.rows.holdout
    parent = serving_version(repo, model)
    scored = _score_holdouts(repo, model, model_file, parent, holdout, log)
    decider, decider_why = pick_holdout(holdout.part(True)[1], min_traffic_holdout, binary=False)
    if decider not in scored:
        raise SystemExit("no held-out images to judge the candidate on")
    chosen = scored[decider]
    verdict, why = gate(chosen["candidate"], chosen["serving"], tolerance, metric="accuracy",
                        holdout=f"{decider} holdout")
    metadata = version_metadata(
        training_data=prepared.training_data(), params=params, parent_version=parent,
        metrics={**chosen["candidate"], "holdout": decider, "holdout_rows": chosen["rows"]},
        class_names=[str(c) for c in range(10)],
        gate=verdict, gate_reason=why, gate_holdout=decider, gate_holdout_reason=decider_why, holdouts=scored,
        serving_version=parent, serving_metrics=chosen["serving"], ray_job=ray_job_id(), training=finite(training),
        monitoring=digits_monitoring(model_file, holdout.x, holdout.y),
    )
    config = None
    if model not in repo.list_models():
        config = digits_config()
        config.name = model
    version = repo.publish(model, {"model.pt": model_file}, metadata, config=config)
    for name, entry in scored.items():
        m = entry["candidate"]
        log(f"candidate on the {name} holdout ({entry['rows']} images): accuracy {m['accuracy']:.4f}, "
            f"loss {m['loss']:.4f}")
    log_verdict(log, model, version, repo.version(model, version).path, verdict, why,
                decider_why if "traffic" in scored else None)
    return version, metadata


def run_digits(args: argparse.Namespace, job) -> int:
    """The digits retrain of `training.retrain.main` (`job`: its JobStart, Ray connected)."""
    from ray.train.torch import TorchTrainer

    from training.digits_loop import load_digits_checkpoint, train_digits_worker
    from training.retrain import fit_best, run_config, trainer_kwargs, use_gpu_flag

    check_preprocessing(job.repo, job.model)
    prepared = prepare_digits(job.root, job.model, include_traffic=not args.no_traffic,
                              window_days=args.label_window_days, traffic_share=args.traffic_weight)
    given = {k: getattr(args, k) for k in ("hidden", "lr", "weight_decay", "batch_size")}
    params = replace(DigitsParams(), epochs=args.epochs, **{k: v for k, v in given.items() if v is not None})
    fault = f"{job.storage}/{job.name}/fault-injected" if args.fail_at_epoch else None
    config = digits_worker_config(prepared, params, seed=args.seed, fault_marker=fault,
                                  fail_at_epoch=None if args.fail_at_epoch is None else args.fail_at_epoch - 1)
    use_gpu = use_gpu_flag(args.use_gpu)
    print(f"training {job.model}: {args.num_workers} worker(s){' on GPU' if use_gpu else ''}, {args.epochs} "
          f"epoch(s); checkpoints in {job.storage}/{job.name}", flush=True)
    trainer = TorchTrainer(train_digits_worker, train_loop_config=config, **trainer_kwargs(
        prepared.datasets, num_workers=args.num_workers, use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker,
        run_config=run_config(job, keep_checkpoints=args.keep_checkpoints, max_failures=args.max_failures)))
    best = fit_best(trainer)
    if best is None:
        return 1
    net, info = load_digits_checkpoint(best, config)
    record = {"num_workers": args.num_workers, "use_gpu": use_gpu, "epochs": args.epochs,
              "max_failures": args.max_failures, "run": f"{job.storage}/{job.name}",
              "fault_injected": bool(fault and os.path.exists(fault)),
              "best_epoch": info["epoch"] + 1, "best_val_loss": info["val_loss"], "checkpoint": best.path,
              "duration_s": round(time.perf_counter() - job.started, 1)}
    run_params = {**asdict(params), "channels": list(params.channels), "seed": args.seed, "optimizer": "adam",
                  "traffic_weight": args.traffic_weight, "label_window_days": args.label_window_days,
                  "loss": "mean(row weight * cross_entropy)", "trainer": "ray.train.torch.TorchTrainer"}
    run_params.pop("holdout_fraction")
    publish_digits(job.repo, job.model, export_torchscript(net), prepared, params=run_params, training=record,
                   tolerance=args.tolerance, min_traffic_holdout=args.min_traffic_holdout)
    print(f"done in {time.perf_counter() - job.started:.1f} s", flush=True)
    return 0
