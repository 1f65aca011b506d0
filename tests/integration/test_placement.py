"""Model placement in the running cluster: colocated in the ingress replicas, or split into a worker deployment."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import ray

from cluster.status import describe_cluster
from serving.app import INGRESS_NAME, DeploymentOptions, build_app, traffic_nodes

pytestmark = pytest.mark.integration


def _infer(base_url: str, model: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = httpx.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_colocated_and_split_models_serve_the_same_file_with_the_same_answers(base_url, fleet_cluster):
    settings = fleet_cluster[0]
    info = describe_cluster({"url": base_url, "dashboard_url": settings.dashboard_url,
                             "repository": settings.repository})
    placement = {m["name"]: (m["placement"], m["replicas"]) for m in info["models"]}
    # The cluster default (auto, no GPU) colocates; fraud_slowq's config asks for its own deployment.
    assert placement["fraud"] == ("colocated", 0)
    assert placement["fraud_slowq"] == ("split", 1)
    assert info["ingress_replicas"] == settings.ingress_replicas

    x = np.random.default_rng(5).standard_normal((7, 30)).astype(np.float32)
    colocated = _infer(base_url, "fraud", x)
    split = _infer(base_url, "fraud_slowq", x)
    assert colocated.shape == (7, 1)
    np.testing.assert_allclose(colocated, split, rtol=0, atol=1e-6)


def test_ingress_node_labels_pick_the_nodes_carrying_them_and_a_label_no_node_has_is_refused(fleet_cluster):
    """`ingress_node_labels` against the running cluster's real node labels (Ray gives every node
    `ray.io/node-id`): the ingress goes to the nodes that carry them, and only there (a label selector);
    labels no alive node has stop the deployment with their name."""
    settings = fleet_cluster[0]
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert traffic_nodes({}) == alive
    head = alive[0]
    labels = {"ray.io/node-id": head["Labels"]["ray.io/node-id"]}
    assert [n["NodeID"] for n in traffic_nodes(labels)] == [head["NodeID"]]
    options = settings.serving_options()
    app = build_app(options, DeploymentOptions(ingress_per_node=2, ingress_node_labels=tuple(labels.items())),
                    models=["fraud"])
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME and ingress._deployment_config.num_replicas == 2  # 2 per labelled node
    assert ingress._replica_config.max_replicas_per_node == 2
    assert ingress.ray_actor_options["label_selector"] == labels
    with pytest.raises(ValueError, match=r"no alive Ray node has the labels \{'fleet/ingress': 'yes'\}"):
        build_app(options, DeploymentOptions(ingress_per_node=1, ingress_node_labels=(("fleet/ingress", "yes"),)),
                  models=["fraud"])
