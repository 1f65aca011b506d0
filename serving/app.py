"""Build fleet's Serve application from the repository: the ingress, and a worker deployment per split model.

Placement of a model (`DeploymentOptions.placement`):
- "colocated": the model runs inside every ingress replica; a batch is a call on a
  local thread, with no Ray call (the faster mode for small CPU models; measured
  by `python -m benchmarks`);
- "split": the model has its own worker deployment, one DeploymentHandle call per
  batch (GPU workers, big models, independent scaling);
- "auto" (default): split for a model that gets a GPU, colocated otherwise.
A model's config may override it: `parameters { key: "fleet.placement" value: { string_value: "split" } }`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve import Application

from serving.autoscale import AutoscalePolicy
from serving.fallback import check_fallbacks
from serving.ingress import Ingress
from serving.model_config import PLACEMENT_PARAM, PREFER_LABELS_PARAM, node_labels
from serving.options import ServingOptions
from serving.registry import ModelRepository
from serving.workers import ModelWorker

__all__ = ["DeploymentOptions", "build_app", "APP_NAME", "INGRESS_NAME", "PLACEMENTS", "worker_name"]

_log = logging.getLogger("fleet.app")

APP_NAME = "fleet"
PLACEMENTS = ("auto", "colocated", "split")
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
    placement: str = "auto"  # "auto" | "colocated" | "split"
    ingress_per_node: int | None = None  # replicas on every node taking traffic, instead of ingress_replicas in all
    ingress_node_labels: tuple[tuple[str, str], ...] = ()  # the Ray labels of the nodes taking traffic (none: all)
    ingress_autoscaling: AutoscalePolicy | None = None  # instead of a fixed ingress_replicas (serving/autoscale.py)
    worker_autoscaling: AutoscalePolicy | None = None  # instead of a fixed worker_replicas

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.ingress_autoscaling is not None and self.ingress_per_node:
            raise ValueError("ingress_autoscaling and ingress_per_node cannot both be set")


def _count(fixed: int, policy: AutoscalePolicy | None) -> str:
    return str(fixed) if policy is None else f"{policy.min_replicas}-{policy.max_replicas} (autoscaled)"


def _replicas(fixed: int, policy: AutoscalePolicy | None) -> dict:
    """A deployment's replica options: a fixed count, or Serve's autoscaling on fleet's policy."""
    return {"num_replicas": fixed} if policy is None else {"autoscaling_config": policy.serve_config()}



def traffic_nodes(labels: dict[str, str]) -> list[dict]:
    """The alive nodes of the Ray cluster carrying every one of `labels` (all alive nodes when none)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")
            and all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]


def build_app(options: ServingOptions, deployment: DeploymentOptions = DeploymentOptions(),
              models: list[str] | None = None, env_vars: dict[str, str] | None = None) -> Application:
    """The application graph: ingress bound to a handle for each split model's worker (None: colocated).

    `env_vars`: set in every replica's environment (a Ray cluster fleet did not start has its own)."""
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    repository = ModelRepository(options.repository)
    names = models if models is not None else repository.list_models()
    check_fallbacks({name: repository.spec(name) for name in names})  # a bad fleet.fallback fails here, named
    ingress_options: dict = {"num_cpus": deployment.ingress_num_cpus}
    if runtime_env:
        ingress_options["runtime_env"] = runtime_env
    ingress_replicas, per_node = deployment.ingress_replicas, {}
    if deployment.ingress_per_node:
        # Every node taking traffic gets its replicas (its listeners: a load balancer in front reaches each node);
        # counted now, at deployment: a node that joins later has none until fleet is deployed again.
        labels = dict(deployment.ingress_node_labels)
        nodes = traffic_nodes(labels)
        if not nodes:
            raise ValueError(f"no alive Ray node has the labels {labels} that ingress_node_labels asks for")
        ingress_replicas = deployment.ingress_per_node * len(nodes)
        per_node = {"max_replicas_per_node": deployment.ingress_per_node}
        if labels:
            ingress_options["label_selector"] = labels
        _log.info("ingress: %d replica(s) on each of %d node(s)", deployment.ingress_per_node, len(nodes))
    workers = {}
    for name in names:
        spec = repository.spec(name)
        replicas = deployment.worker_replicas or spec.instance_count
        use_gpu = spec.backend == "torchscript" and deployment.gpus_available and spec.instance_kind != "cpu"
        placement = spec.parameters.get(PLACEMENT_PARAM, deployment.placement)
        if placement == "colocated" or (placement == "auto" and not use_gpu):
            workers[name] = None
            _log.info("model %s: colocated in the ingress replicas", name)
            continue
        ingress_most = deployment.ingress_autoscaling.max_replicas if deployment.ingress_autoscaling else ingress_replicas
        inflight_per_replica = options.max_inflight_batches * ingress_most
        actor_options = {"num_cpus": deployment.worker_num_cpus, "num_gpus": 1 if use_gpu else 0}
        if runtime_env:
            actor_options["runtime_env"] = runtime_env
        if PREFER_LABELS_PARAM in spec.parameters:
            # Preferred, not required: with no such node (or it is lost), any node takes the replica.
            actor_options["label_selector"] = node_labels(spec.parameters[PREFER_LABELS_PARAM])
            actor_options["fallback_strategy"] = [{"label_selector": {}}]
        workers[name] = (
            serve.deployment(ModelWorker)
            .options(
                name=worker_name(name),
                **_replicas(replicas, deployment.worker_autoscaling),
                # The batchers bound what is in flight; this only has to stay above it.
                max_ongoing_requests=max(8, 2 * inflight_per_replica),
                ray_actor_options=actor_options,
                health_check_period_s=5,
                graceful_shutdown_timeout_s=10,
                graceful_shutdown_wait_loop_s=0.5,  # how often a stopping replica looks for calls still running
            )
            .bind(options.repository, name, options.worker_threads,
                  version_poll_interval_s=options.version_poll_interval_s,
                  version_retire_grace_s=options.version_retire_grace_s, telemetry=options.telemetry())
        )
        _log.info("model %s: %s worker replica(s)%s", name, _count(replicas, deployment.worker_autoscaling),
                  " on GPU" if use_gpu else "")
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME,
        **_replicas(ingress_replicas, deployment.ingress_autoscaling),
        max_ongoing_requests=10_000,
        ray_actor_options=ingress_options,
        **per_node,
        # A stopping replica drains its connections, then its queues (each up to drain_timeout_s).
        graceful_shutdown_timeout_s=2 * options.drain_timeout_s + 5,
        graceful_shutdown_wait_loop_s=0.5,
    )
    return ingress.bind(options.to_dict(), workers)
