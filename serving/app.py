"""Build fleet's Serve application from the repository: one worker deployment per model, one ingress."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve import Application

from serving.ingress import Ingress
from serving.options import ServingOptions
from serving.registry import ModelRepository
from serving.workers import ModelWorker

__all__ = ["DeploymentOptions", "build_app", "APP_NAME", "INGRESS_NAME", "worker_name"]

_log = logging.getLogger("fleet.app")

APP_NAME = "fleet"
INGRESS_NAME = "ingress"


def worker_name(model: str) -> str:
    return f"worker-{model}"


@dataclass(frozen=True)
class DeploymentOptions:
    """Replica counts and resources; from `cluster.config.FleetSettings`."""

    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25
    worker_num_cpus: float = 0.25
    worker_replicas: int | None = None  # None: the config's instance_group count
    gpus_available: bool = False


def build_app(options: ServingOptions, deployment: DeploymentOptions = DeploymentOptions(),
              models: list[str] | None = None) -> Application:
    """The application graph: ingress bound to a handle for each model's worker."""
    repository = ModelRepository(options.repository)
    names = models if models is not None else repository.list_models()
    workers = {}
    for name in names:
        spec = repository.spec(name)
        replicas = deployment.worker_replicas or spec.instance_count
        use_gpu = spec.backend == "torchscript" and deployment.gpus_available and spec.instance_kind != "cpu"
        inflight_per_replica = options.max_inflight_batches * deployment.ingress_replicas
        workers[name] = (
            serve.deployment(ModelWorker)
            .options(
                name=worker_name(name),
                num_replicas=replicas,
                # The batchers bound what is in flight; this only has to stay above it.
                max_ongoing_requests=max(8, 2 * inflight_per_replica),
                ray_actor_options={"num_cpus": deployment.worker_num_cpus, "num_gpus": 1 if use_gpu else 0},
                health_check_period_s=5,
                graceful_shutdown_timeout_s=10,
            )
            .bind(options.repository, name, options.worker_threads)
        )
        _log.info("model %s: %d worker replica(s)%s", name, replicas, " on GPU" if use_gpu else "")
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME,
        num_replicas=deployment.ingress_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": deployment.ingress_num_cpus},
        graceful_shutdown_timeout_s=10,
    )
    return ingress.bind(options.to_dict(), workers)
