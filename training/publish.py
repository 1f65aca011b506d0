"""The end of every training job: judge the candidate against the version now serving, then publish it.

Both are scored on the same holdout rows, each standardized with its own
version's reference statistics exactly as the server would (`preprocess:
standardize`). There are up to two holdouts: the example data's (old rows) and
the labelled traffic's (recent rows, split off by the same row hash). A holdout
of old data cannot show that a model trained after a drift is better, so the
traffic holdout decides whenever it has `min_traffic_holdout` rows and, for a
binary model, `MIN_CLASS_ROWS` of each class; otherwise the example holdout
does. Both holdouts' metrics go into metadata.json (`holdouts`), with the one
that decided (`gate_holdout`) and why.

The gate: a candidate whose ROC AUC (accuracy for a classifier of many classes)
on the deciding holdout is more than `tolerance` below the serving version's is
published with `"gate": "rejected"` (kept for the record, never served: the
registry skips it); otherwise `"gate": "accepted"`, and a cluster with
`version_policy: latest` switches to it.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Mapping

import numpy as np

from serving.errors import FleetError
from serving.registry import ModelRepository
from training.bootstrap import FRAUD_CLIP, fraud_config, fraud_metadata, score_file
from training.data import HOLDOUT_PERCENT, split_buckets
from training.reference import fraud_monitoring

__all__ = ["REPOSITORY_ENV", "DEFAULT_TOLERANCE", "DEFAULT_MIN_TRAFFIC_HOLDOUT", "MIN_CLASS_ROWS",
           "resolve_repository", "ray_job_id", "serving_version", "score_version", "gate", "pick_holdout",
           "publish_candidate", "finite", "read_bytes", "log_verdict"]

REPOSITORY_ENV = "FLEET_REPOSITORY"  # set by `fleet up` for the jobs of its cluster
DEFAULT_TOLERANCE = 0.002
DEFAULT_MIN_TRAFFIC_HOLDOUT = 500  # rows of labelled traffic in the holdout before it decides the gate
MIN_CLASS_ROWS = 10  # and, for a binary model, rows of each class (a ROC AUC needs both, and more than one)


def resolve_repository(flag: str | None) -> str:
    """The repository to publish into: the flag, else FLEET_REPOSITORY; a relative path is refused.

    A job runs in a copy of the working dir, so a relative path would publish into that copy.
    """
    root = flag or os.environ.get(REPOSITORY_ENV)
    if not root:
        raise SystemExit(f"no repository: pass --repository or run on a `fleet up` cluster (it sets {REPOSITORY_ENV})")
    if "://" not in root and not os.path.isabs(root):
        raise SystemExit(f"--repository {root!r} is relative: a Ray job runs in a copy of the working dir, "
                         "so give an absolute path or a URI")
    return root


def ray_job_id() -> dict:
    """The Ray job ids of this process: the submission id (`ray job submit`) and the driver's job id."""
    ids: dict = {"submission_id": None, "job_id": None}
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            ids["submission_id"] = json.loads(raw).get("metadata", {}).get("job_submission_id")
        except ValueError:
            pass
    try:
        import ray

        if ray.is_initialized():
            ids["job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - provenance only
        pass
    return ids


def serving_version(repo: ModelRepository, model: str) -> int | None:
    """The version the cluster serves by default (the newest its policy selects), or None for a new model."""
    if model not in repo.list_models():
        return None
    versions = repo.served_versions(model)
    return versions[-1] if versions else None


def score_version(repo: ModelRepository, model: str, version: int, x: np.ndarray, y: np.ndarray) -> dict:
    """Holdout metrics of a published version: its file on rows standardized with its own statistics."""
    metadata = repo.metadata(model, version)
    data = read_bytes(repo.model_file(model, version))
    clip = float(repo.spec(model).parameters.get("preprocess.clip", FRAUD_CLIP))
    return score_file(data, metadata, x, y, clip)


_METRIC_NAMES = {"roc_auc": "ROC AUC", "accuracy": "accuracy"}


def gate(candidate: Mapping, serving: Mapping | None, tolerance: float = DEFAULT_TOLERANCE, *,
         metric: str = "roc_auc", holdout: str = "holdout") -> tuple[str, str]:
    """("accepted" | "rejected", why), comparing `metric` on a holdout (the loss when it is undefined)."""
    if serving is None:
        return "accepted", "no version is serving: the first one is accepted"
    c, s = candidate.get(metric), serving.get(metric)
    if c is not None and s is not None:
        verdict = "accepted" if c >= s - tolerance else "rejected"
        name = _METRIC_NAMES.get(metric, metric)
        return verdict, f"{holdout} {name} {c:.4f} vs {s:.4f} serving (tolerance {tolerance})"
    c, s = candidate["loss"], serving["loss"]
    verdict = "accepted" if c <= s * (1 + tolerance) else "rejected"
    return verdict, f"{holdout} loss {c:.4f} vs {s:.4f} serving (relative tolerance {tolerance})"


def pick_holdout(traffic_labels: np.ndarray | None, min_rows: int = DEFAULT_MIN_TRAFFIC_HOLDOUT, *,
                 binary: bool = True) -> tuple[str, str]:
    """("traffic" | "example", why): the holdout that decides the gate, given the traffic holdout's labels."""
    y = np.zeros(0, np.int64) if traffic_labels is None else np.asarray(traffic_labels).reshape(-1)
    if len(y) < min_rows:
        return "example", f"the traffic holdout has {len(y)} labelled rows, fewer than {min_rows}"
    if binary:
        positives = int((y == 1).sum())
        fewest = min(positives, len(y) - positives)
        if fewest < MIN_CLASS_ROWS:
            return "example", (f"the traffic holdout's {len(y)} rows hold {positives} positives: fewer than "
                               f"{MIN_CLASS_ROWS} of a class")
    return "traffic", f"the traffic holdout has {len(y)} labelled rows: recent data decides"


def finite(metrics: Mapping) -> dict:
    """`metrics` with NaN and infinities as None (metadata.json is strict JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _score_holdouts(repo: ModelRepository, model: str, model_file: bytes, served: Mapping, parent: int | None,
                    holdouts: Mapping[str, tuple[np.ndarray, np.ndarray]], log) -> dict:
    """{name: {"rows", "positives", "candidate": metrics, "serving": metrics | None}} of the non-empty holdouts."""
    out = {}
    for name, (x, y) in holdouts.items():
        if len(y) == 0:
            continue
        entry = {"rows": int(len(y)), "positives": int(np.sum(y)), "candidate": score_file(model_file, served, x, y),
                 "serving": None}
        if parent is not None:
            try:
                entry["serving"] = score_version(repo, model, parent, x, y)
            except (FleetError, OSError, RuntimeError, ValueError) as exc:  # e.g. a version with other features
                log(f"could not score the serving version {parent} on the {name} holdout ({exc}); judging without it")
        out[name] = entry
    return out


def publish_candidate(
    repo: ModelRepository,
    model: str,
    model_file: bytes,
    *,
    holdout: tuple[np.ndarray, np.ndarray],
    reference: Mapping,
    training_data: Mapping,
    params: Mapping,
    training: Mapping,
    x_train: np.ndarray,
    traffic_holdout: tuple[np.ndarray, np.ndarray] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_traffic_holdout: int = DEFAULT_MIN_TRAFFIC_HOLDOUT,
    monitoring_rows: tuple[np.ndarray, np.ndarray] | None = None,
    log=print,
) -> tuple[int, dict]:
    """Score, gate and publish `model_file` (TorchScript taking z-scores); return (version, metadata).

    `holdout` is the example data's held-out rows, `traffic_holdout` the labelled traffic's;
    `x_train` the raw training rows (the monitoring reference's PCA is fitted on them). `monitoring_rows`
    (x, y), when given, are the rows the monitoring reference describes instead (the newest labelled
    traffic): its PCA is fitted on them, and its score, PCA-error and label-error histograms taken on those
    of them in the holdout buckets (all of them when fewer than 1,000 are).
    """
    served = {"feature_names": list(reference), "reference_stats": dict(reference)}
    parent = serving_version(repo, model)
    holdouts = {"example": holdout, **({"traffic": traffic_holdout} if traffic_holdout is not None else {})}
    scored = _score_holdouts(repo, model, model_file, served, parent, holdouts, log)
    decider, decider_why = pick_holdout(traffic_holdout[1] if traffic_holdout else None, min_traffic_holdout)
    if decider not in scored:
        raise SystemExit("no held-out rows to judge the candidate on: the data is too small to split")
    chosen = scored[decider]
    verdict, why = gate(chosen["candidate"], chosen["serving"], tolerance, holdout=f"{decider} holdout")
    x_hold = np.concatenate([x for x, _ in holdouts.values()])
    y_hold = np.concatenate([y for _, y in holdouts.values()])
    metadata = fraud_metadata(
        training_data=training_data,
        params=params,
        metrics={**chosen["candidate"], "holdout": decider, "holdout_rows": chosen["rows"],
                 "holdout_positives": chosen["positives"]},
        reference=reference,
        parent_version=parent,
    )
    metadata.update({
        "gate": verdict,
        "gate_reason": why,
        "gate_holdout": decider,
        "gate_holdout_reason": decider_why,
        "holdouts": scored,
        "serving_version": parent,
        "serving_metrics": chosen["serving"],
        "ray_job": ray_job_id(),
        "training": finite(training),
        "monitoring": _monitoring(model_file, served, x_train, x_hold, y_hold, monitoring_rows),
    })
    config = None if model in repo.list_models() else _config_for(model)
    version = repo.publish(model, {"model.pt": model_file}, metadata, config=config)
    where = repo.version(model, version).path
    for name, entry in scored.items():
        m = entry["candidate"]
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        log(f"candidate on the {name} holdout ({entry['rows']} rows): loss {m['loss']:.4f}, accuracy "
            f"{m['accuracy']:.4f}, ROC AUC {auc}")
    log_verdict(log, model, version, where, verdict, why, decider_why if "traffic" in scored else None)
    return version, metadata


def log_verdict(log, model: str, version: int, where: str, verdict: str, why: str, decider_why: str | None) -> None:
    """The gate's verdict and where the version was published (`decider_why`: why that holdout decided, if it
    is worth saying)."""
    log(f"gate: {verdict} ({why}{f'; {decider_why}' if decider_why else ''})")
    note = "served once the cluster picks it up" if verdict == "accepted" else "kept for the record, not served"
    log(f"published {model} version {version} ({verdict}: {note}) at {where}")


def _monitoring(model_file: bytes, served: Mapping, x_train: np.ndarray, x_hold: np.ndarray, y_hold: np.ndarray,
                monitoring_rows: tuple[np.ndarray, np.ndarray] | None) -> dict:
    if monitoring_rows is None:
        return fraud_monitoring(model_file, served, x_train, x_hold, y_hold, FRAUD_CLIP)
    x, y = monitoring_rows
    held = split_buckets(x) < HOLDOUT_PERCENT
    if held.sum() >= 1000:
        return fraud_monitoring(model_file, served, x, x[held], y[held], FRAUD_CLIP)
    return fraud_monitoring(model_file, served, x, x, y, FRAUD_CLIP)


def _config_for(model: str):
    config = fraud_config()
    config.name = model
    return config


def read_bytes(source) -> bytes:
    """The bytes of a repository file handle (a path or a BytesIO, as `ModelRepository.model_file` returns)."""
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    with open(source, "rb") as f:
        return f.read()
