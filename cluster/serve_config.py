"""fleet as a Ray Serve config file: what `fleet render serve-config` writes and `serve deploy` runs.

    fleet render serve-config -o fleet-serve.yaml      # fleet.yaml, FLEET_* and flags, as for `fleet up`
    serve deploy fleet-serve.yaml --address http://<head>:8265

The file names fleet's application builder (`app_builder`, imported by Serve on the cluster)
with every setting as its `args`, so the cluster needs fleet installed, not fleet.yaml.
API keys and the admin token are in it only as digests (`sha256:...`, as `fleet up` hands
them to Ray); a keys file is read here and not named in it. The builder starts fleet's
monitor (rollout controller, drift and quality) before the deployments, as `fleet up` does.
"""

from __future__ import annotations

from typing import Any

from cluster.config import FleetSettings

__all__ = ["render_serve_config", "app_builder", "IMPORT_PATH"]

IMPORT_PATH = "cluster.serve_config:app_builder"


def render_serve_config(settings: FleetSettings) -> dict[str, Any]:
    """The Serve config (`ray.serve.schema.ServeDeploySchema`, validated here) deploying fleet with `settings`."""
    from ray.serve.schema import ServeDeploySchema

    from cluster.local import ray_env, replica_env
    from serving.app import APP_NAME

    args = settings.model_dump(mode="json", exclude_none=True)
    args.pop("api_keys_file", None)  # read already: its keys are in api_keys, as digests
    doc = {
        # fleet's ingress replicas listen on the port themselves (SO_REUSEPORT): Serve's proxy stays off.
        "proxy_location": "Disabled" if settings.http_server == "fleet" else "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "logging_config": {"enable_access_log": False},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": args,
            "runtime_env": {"env_vars": replica_env(ray_env(settings))},
        }],
    }
    ServeDeploySchema.model_validate(doc)
    return doc


def app_builder(args: dict[str, Any]):
    """Serve's application builder for the config above: fleet's application, its monitor started first."""
    import ray

    from cluster.local import fleet_app

    settings = FleetSettings(**args)
    if settings.num_cpus is None:  # one ingress replica per CPU of the cluster (at most 8), not of this process's node
        settings = settings.model_copy(update={"num_cpus": max(1, int(ray.cluster_resources().get("CPU", 1)))})
    return fleet_app(settings, settings.serving_options())
