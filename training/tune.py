"""Search fraud's hyper-parameters with Ray Tune (ASHA), each trial a TorchTrainer; publish the best.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m training.tune --model fraud --num-samples 8

The data is read and split once (as in training.retrain) and shared by every
trial. A trial launches a TorchTrainer over it; `TuneReportCallback` passes
each epoch's validation loss to Tune, so `ASHAScheduler` stops the weak trials
early. The best checkpoint of the best trial is gated and published like a
retrain's, with the search recorded in its metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace

from training.bootstrap import TrainParams
from training.retrain import (Prepared, add_common_flags, check_common_flags, make_trainer, prepare, publish_best,
                              start_job, use_gpu_flag, worker_config)

__all__ = ["search_space", "main"]

METRIC, MODE = "val_loss", "min"


def search_space() -> dict:
    """Learning rate, hidden width, depth, batch size and weight decay."""
    from ray import tune

    return {
        "lr": tune.loguniform(1e-4, 1e-2),
        "hidden": tune.choice([32, 64, 128]),
        "depth": tune.choice([1, 2, 3]),
        "batch_size": tune.choice([128, 256, 512]),
        "weight_decay": tune.loguniform(1e-6, 1e-3),
    }


def _params(base: TrainParams, sampled: dict) -> TrainParams:
    return replace(base, lr=float(sampled["lr"]), hidden=int(sampled["hidden"]), depth=int(sampled["depth"]),
                   batch_size=int(sampled["batch_size"]), weight_decay=float(sampled["weight_decay"]))


def _trial(config: dict, *, prepared: Prepared, base: TrainParams, seed: int, num_workers: int, use_gpu: bool,
           cpus_per_worker: float, storage: str) -> None:
    """One trial: a TorchTrainer with the sampled parameters, its epochs reported to Tune."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    params = _params(base, config)
    run_config = ray.train.RunConfig(
        name=f"{tune.get_context().get_experiment_name()}-{tune.get_context().get_trial_id()}",
        storage_path=storage,
        # The one checkpoint kept is the trial's best: the path Tune records for it stays valid.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                     checkpoint_score_order=MODE),
        callbacks=[TuneReportCallback()],
    )
    trainer = make_trainer(prepared, worker_config(prepared, params, seed=seed), num_workers=num_workers,
                           use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, run_config=run_config)
    trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tune", description=__doc__.split("\n\n")[0])
    add_common_flags(parser, models=("fraud",))
    parser.add_argument("--num-samples", type=int, default=8, help="trials")
    parser.add_argument("--max-epochs", type=int, default=4, help="epochs of a trial ASHA lets run to the end")
    parser.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    args = parser.parse_args(argv)
    check_common_flags(parser, args)
    if min(args.num_samples, args.max_epochs, args.num_workers, args.max_concurrent) < 1:
        parser.error("--num-samples, --max-epochs, --num-workers and --max-concurrent must be >= 1")
    from ray import tune
    from ray.train import Checkpoint
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    job = start_job(args, "tune")
    repo, model, storage, name, started = job.repo, job.model, job.storage, job.name, job.started
    prepared = prepare(args.model, job.root, served=model, include_traffic=not args.no_traffic,
                       window_days=args.label_window_days, traffic_share=args.traffic_weight,
                       reference_rows=args.reference_rows)
    base = replace(TrainParams(), epochs=args.max_epochs)
    use_gpu = use_gpu_flag(args.use_gpu)
    trial = tune.with_parameters(_trial, prepared=prepared, base=base, seed=args.seed, num_workers=args.num_workers,
                                 use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker, storage=storage)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=args.max_epochs, grace_period=args.grace_period,
                              reduction_factor=2)
    print(f"tuning {model}: {args.num_samples} trials of {args.num_workers} worker(s), up to {args.max_epochs} "
          f"epochs each, ASHA on {METRIC}; results in {storage}/{name}", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.01}),  # the trial only drives its trainer; the workers hold the CPUs
        param_space=search_space(),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, scheduler=scheduler, num_samples=args.num_samples,
                                    # Tune ignores max_concurrent_trials when given a search_alg that is not a
                                    # Searcher (with a warning): the generator itself takes the limit.
                                    search_alg=BasicVariantGenerator(random_state=args.seed,  # --seed: same trials
                                                                     max_concurrent=args.max_concurrent)),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1),
    )
    results = tuner.fit()
    trials = []
    for r in results:
        frame = r.metrics_dataframe
        epochs, best_loss, span = 0, None, {}
        if frame is not None and not frame.empty:
            epochs, best_loss = int(frame["training_iteration"].max()), float(frame[METRIC].min())
            span = {"started_at": float(frame["timestamp"].iloc[0] - frame["time_total_s"].iloc[0]),
                    "ended_at": float(frame["timestamp"].iloc[-1])}  # Tune's timestamps are whole seconds
        trials.append({"config": r.config, "epochs": epochs, "best_val_loss": best_loss, **span,
                       "stopped_early": epochs < args.max_epochs, "error": None if r.error is None else str(r.error)})
        print(f"  trial {r.path.rsplit('/', 1)[-1] if r.path else '?'}: {epochs} epoch(s), best {METRIC} "
              f"{best_loss if best_loss is None else round(best_loss, 4)}"
              f"{' (stopped early by ASHA)' if epochs < args.max_epochs else ''}", flush=True)
    completed = [t for t in trials if t["best_val_loss"] is not None]
    if not completed:
        print("no trial reported a result", file=sys.stderr)
        return 1
    best = results.get_best_result(METRIC, MODE, scope="all")
    frame = best.metrics_dataframe
    row = frame.loc[frame[METRIC].idxmin()]
    params = _params(base, best.config)
    config = worker_config(prepared, params, seed=args.seed)
    stopped = sum(t["stopped_early"] for t in trials)
    print(f"best trial: {best.config} ({METRIC} {row[METRIC]:.4f} at epoch {int(row['training_iteration'])}); "
          f"ASHA stopped {stopped} of {len(trials)} trials early", flush=True)
    record = {"num_workers": args.num_workers, "use_gpu": use_gpu, "tuner": "ray.tune.Tuner + ASHAScheduler",
              "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
              "max_epochs": args.max_epochs, "stopped_early": stopped,
              "trials": trials, "experiment": f"{storage}/{name}",
              "duration_s": round(time.perf_counter() - started, 1)}
    run_params = {**asdict(params), "seed": args.seed, "optimizer": "adam", "traffic_weight": args.traffic_weight,
                  "label_window_days": args.label_window_days,
                  "loss": "mean(row weight * bce_with_logits(pos_weight=weighted neg/pos))",
                  "trainer": "ray.train.torch.TorchTrainer per trial"}
    run_params.pop("holdout_fraction")
    publish_best(prepared, Checkpoint(row["checkpoint_path"]), config, repo, model, params=run_params,
                 training=record, tolerance=args.tolerance, min_traffic_holdout=args.min_traffic_holdout)
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
