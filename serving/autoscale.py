"""Autoscaling fleet's deployments on fleet's own load (Serve's autoscaler, fleet's policy and metric).

Serve counts the requests that reach a replica through Serve (its proxy or a
DeploymentHandle). fleet's ingress replicas take their requests on their own
sockets (`serving.http_server`), so Serve sees none of them: each ingress replica
reports them itself, as the custom autoscaling metric `LOAD_METRIC` (requests read
from its connections and not yet answered: running, queued in the batchers, or
pipelined behind another), through `record_autoscaling_stats`. A split model's
worker replicas are reached through a handle, so Serve's own count (the batches in
flight to them) is their load; the ingress's batchers bound it at
`max_inflight_batches` per ingress replica and version, so a saturated worker
shows as that bound.

`fleet_load_policy` (Serve calls it every control-loop tick in its controller)
wants `ceil(load / target_load)` replicas: the sum over running replicas of the
metric, averaged over `look_back_s`, plus Serve's own count. Serve's wrapper then
applies the delays (`upscale_delay_s`, `downscale_delay_s`) and
min/max_replicas. A replica scaled down leaves as in a rolling update: it stops
accepting connections, answers what it has read and queued, flushes its
prediction log, then exits (`serving.ingress.Ingress.__del__`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LOAD_METRIC", "AutoscalePolicy", "fleet_load_policy", "METRIC_ENV", "POLICY_IMPORT_PATH"]

LOAD_METRIC = "fleet_load"
POLICY_IMPORT_PATH = "serving.autoscale:fleet_load_policy"
# How often replicas and handles push their autoscaling metrics to Serve's controller (Serve's default: every
# 10 s, which alone would miss a 15 s scale-up goal). Read at import by the Ray processes: `cluster.local.ray_env`.
METRIC_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
_PUSH_S = float(METRIC_ENV["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"])


@dataclass(frozen=True)
class AutoscalePolicy:
    """A deployment's replica range and target, validated here (a field of `cluster.config.FleetSettings`)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_load: float = 8.0  # requests (ingress) or batches (worker) in flight per replica
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    look_back_s: float = 2.0

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling needs 1 <= min_replicas <= max_replicas, got min_replicas "
                             f"{self.min_replicas} and max_replicas {self.max_replicas}")
        if not self.target_load > 0 or not self.look_back_s > _PUSH_S:
            raise ValueError(f"autoscaling needs target_load > 0 and look_back_s > {_PUSH_S}, got "
                             f"{self.target_load} and {self.look_back_s}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("autoscaling delays are >= 0 seconds")

    def serve_config(self) -> dict:
        """Serve's `autoscaling_config` for the deployment."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_load,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_s,
            # Deprecated in Serve for METRIC_ENV, but still checked against look_back_period_s.
            "metrics_interval_s": _PUSH_S,
            # Requests in flight (not a rate): the window's mean, so one burst alone does not scale up.
            "aggregation_function": "mean",
            "policy": {"policy_function": POLICY_IMPORT_PATH},
        }


def desired_replicas(load: float, target: float, low: int, high: int) -> int:
    """Replicas for `load` at `target` per replica, within [low, high]."""
    return max(low, min(high, math.ceil(load / target - 1e-9)))


def fleet_load_policy(ctx) -> tuple[int, dict]:
    """Serve autoscaling policy (an `AutoscalingContext` in): replicas for fleet's load plus Serve's own count."""
    metrics = (ctx.aggregated_metrics or {}).get(LOAD_METRIC) or {}
    running = set(ctx.running_replicas)
    load = sum(v for replica, v in metrics.items() if replica in running) + (ctx.total_num_requests or 0.0)
    target = ctx.config.get_target_ongoing_requests()
    return desired_replicas(load, target, ctx.capacity_adjusted_min_replicas,
                            ctx.capacity_adjusted_max_replicas), {}
