"""The end of every training job: judge the candidate against the version now serving, then publish it.

Both are scored on the same holdout rows, each standardized with its own
version's reference statistics exactly as the server would (`preprocess:
standardize`). The gate: a candidate whose holdout ROC AUC is more than
`tolerance` below the serving version's is published with `"gate": "rejected"`
(kept for the record, never served: the registry skips it); otherwise
`"gate": "accepted"`, and a cluster with `version_policy: latest` switches to it.
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

__all__ = ["REPOSITORY_ENV", "resolve_repository", "ray_job_id", "serving_version", "score_version", "gate",
           "publish_candidate"]

REPOSITORY_ENV = "FLEET_REPOSITORY"  # set by `fleet up` for the jobs of its cluster
DEFAULT_TOLERANCE = 0.002


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
    data = _bytes(repo.model_file(model, version))
    clip = float(repo.spec(model).parameters.get("preprocess.clip", FRAUD_CLIP))
    return score_file(data, metadata, x, y, clip)


def gate(candidate: Mapping, serving: Mapping | None, tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, str]:
    """("accepted" | "rejected", why), comparing holdout ROC AUC (loss when AUC is undefined)."""
    if serving is None:
        return "accepted", "no version is serving: the first one is accepted"
    c, s = candidate.get("roc_auc"), serving.get("roc_auc")
    if c is not None and s is not None:
        verdict = "accepted" if c >= s - tolerance else "rejected"
        return verdict, f"holdout ROC AUC {c:.4f} vs {s:.4f} serving (tolerance {tolerance})"
    c, s = candidate["loss"], serving["loss"]
    verdict = "accepted" if c <= s * (1 + tolerance) else "rejected"
    return verdict, f"holdout loss {c:.4f} vs {s:.4f} serving (relative tolerance {tolerance})"


def _finite(metrics: Mapping) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


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
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
) -> tuple[int, dict]:
    """Score, gate and publish `model_file` (TorchScript taking z-scores); return (version, metadata)."""
    x_hold, y_hold = holdout
    metrics = score_file(model_file, {"feature_names": list(reference), "reference_stats": dict(reference)},
                         x_hold, y_hold)
    parent = serving_version(repo, model)
    serving_metrics = None
    if parent is not None:
        try:
            serving_metrics = score_version(repo, model, parent, x_hold, y_hold)
        except (FleetError, OSError, RuntimeError, ValueError) as exc:  # e.g. a version with other features
            log(f"could not score the serving version {parent} on this holdout ({exc}); judging without it")
    verdict, why = gate(metrics, serving_metrics, tolerance)
    metadata = fraud_metadata(
        training_data=training_data,
        params=params,
        metrics={**metrics, "holdout_rows": int(len(y_hold)), "holdout_positives": int(y_hold.sum())},
        reference=reference,
        parent_version=parent,
    )
    metadata.update({
        "gate": verdict,
        "gate_reason": why,
        "serving_version": parent,
        "serving_metrics": serving_metrics,
        "ray_job": ray_job_id(),
        "training": _finite(training),
    })
    config = None if model in repo.list_models() else _config_for(model)
    version = repo.publish(model, {"model.pt": model_file}, metadata, config=config)
    where = repo.version(model, version).path
    auc = metrics["roc_auc"]
    log(f"candidate: holdout loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}, "
        f"ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}")
    log(f"gate: {verdict} ({why})")
    note = "served once the cluster picks it up" if verdict == "accepted" else "kept for the record, not served"
    log(f"published {model} version {version} ({verdict}: {note}) at {where}")
    return version, metadata


def _config_for(model: str):
    config = fraud_config()
    config.name = model
    return config


def _bytes(source) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    with open(source, "rb") as f:
        return f.read()
