"""fleet's autoscaling policy and settings (serving/autoscale.py): what Serve's controller is told to do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.config import load_settings
from cluster.local import ray_env, replica_env
from serving.app import DeploymentOptions, _replicas
from serving.autoscale import LOAD_METRIC, METRIC_ENV, AutoscalePolicy, fleet_load_policy

DEP = DeploymentID(name="ingress", app_name="fleet")


def _ctx(load: dict[str, float], running: list[str], *, serve_count: float = 0.0, current: int = 1,
         low: int = 1, high: int = 3, target: float = 4.0) -> AutoscalingContext:
    ids = {name: ReplicaID(unique_id=name, deployment_id=DEP) for name in {*load, *running}}
    config = AutoscalingConfig(**AutoscalePolicy(low, high, target).serve_config())
    return AutoscalingContext(
        deployment_id=DEP, deployment_name="ingress", app_name="fleet", current_num_replicas=current,
        target_num_replicas=current, running_replicas=[ids[r] for r in running], total_num_requests=serve_count,
        total_queued_requests=0.0, aggregated_metrics={LOAD_METRIC: {ids[r]: v for r, v in load.items()}},
        raw_metrics=None, capacity_adjusted_min_replicas=low, capacity_adjusted_max_replicas=high,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)


@pytest.mark.parametrize("load, running, want", [
    ({"a": 0.0}, ["a"], 1),                      # idle: the minimum
    ({"a": 4.0}, ["a"], 1),                      # exactly the target
    ({"a": 4.5}, ["a"], 2),                      # just past it
    ({"a": 10.0, "b": 1.0}, ["a", "b"], 3),      # 11 in flight over 4 per replica
    ({"a": 100.0}, ["a"], 3),                    # capped at max_replicas
    ({"a": 2.0, "gone": 50.0}, ["a"], 1),        # a replica that left does not count
])
def test_the_policy_wants_the_load_over_the_target_within_the_range(load, running, want):
    assert fleet_load_policy(_ctx(load, running)) == (want, {})


def test_serves_own_count_adds_to_fleets_load():
    # Requests through Serve (its proxy, or a handle to a worker) are counted by Serve, not by fleet's metric.
    assert fleet_load_policy(_ctx({"a": 3.0}, ["a"], serve_count=6.0))[0] == 3
    assert fleet_load_policy(_ctx({}, ["a"], serve_count=5.0))[0] == 2


def test_settings_are_validated_with_a_clear_error():
    for bad, says in [({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
                      ({"min_replicas": 0, "max_replicas": 2}, "min_replicas <= max_replicas"),
                      ({"target_load": 0}, "target_load > 0"),
                      ({"target_load": 2, "look_back_s": 0.5}, "look_back_s > 0.5"),
                      ({"downscale_delay_s": -1}, "delays")]:
        with pytest.raises(ValidationError, match=says):
            load_settings(ingress_autoscaling=bad)
    with pytest.raises(ValidationError, match="either ingress_replicas"):
        load_settings(ingress_autoscaling={"max_replicas": 2}, ingress_replicas=2)
    with pytest.raises(ValidationError, match="either worker_replicas"):
        load_settings(worker_autoscaling={"max_replicas": 2}, worker_replicas=2)
    with pytest.raises(ValidationError, match="either ingress_per_node"):
        load_settings(ingress_autoscaling={"max_replicas": 2}, ingress_per_node=1)


def test_an_autoscaled_deployment_gets_serves_config_on_fleets_policy_and_fast_metrics():
    settings = load_settings(ingress_autoscaling={"min_replicas": 1, "max_replicas": 3, "target_load": 4},
                             worker_autoscaling={"max_replicas": 2, "target_load": 1})
    options = settings.deployment_options(gpus_available=False)
    ingress = _replicas(2, options.ingress_autoscaling)
    assert set(ingress) == {"autoscaling_config"}  # no fixed num_replicas beside it
    config = AutoscalingConfig(**ingress["autoscaling_config"])  # Serve accepts it
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (1, 1, 3)
    assert config.target_ongoing_requests == 4 and config.policy.policy_function == "serving.autoscale:fleet_load_policy"
    assert AutoscalingConfig(**_replicas(1, options.worker_autoscaling)["autoscaling_config"]).max_replicas == 2
    assert _replicas(2, None) == {"num_replicas": 2}
    # Serve pushes autoscaling metrics every 10 s unless told: the replicas (also in a cluster fleet did not
    # start) get the faster interval, and only when something autoscales.
    assert METRIC_ENV.items() <= replica_env(ray_env(settings)).items()
    assert not METRIC_ENV.keys() & ray_env(load_settings()).keys()
    with pytest.raises(ValueError, match="ingress_per_node"):
        DeploymentOptions(ingress_per_node=1, ingress_autoscaling=AutoscalePolicy(1, 2, 4.0))
