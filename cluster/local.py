"""A local fleet cluster in this process: Ray head (dashboard + job server), Serve, the app.

`LocalCluster` is what the supervisor behind `fleet up` / `make serve` runs and
what the integration tests start once per session.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from cluster.config import FleetSettings
from cluster.ports import free_ports
from serving.autoscale import METRIC_ENV
from serving.http_server import port_is_free

__all__ = ["LocalCluster", "ray_env", "replica_env", "fleet_app", "enable_request_migration"]

# `ray_env` entries a replica reads (the rest concern the raylet, HAProxy or a local job's interpreter): what a
# cluster fleet did not start gets through the deployments' runtime_env, and a Serve config file carries.
_REPLICA_ENV = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "FLEET_REPOSITORY", "FLEET_DATA_DIR", "FLEET_TRAIN_STORAGE",
                *METRIC_ENV)

_log = logging.getLogger("fleet.cluster")


def ray_env(settings: FleetSettings) -> dict[str, str]:
    """Environment the Ray processes must start with (read once, at their import of Serve)."""
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if settings.haproxy else "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if settings.throughput_optimized else "0",
        # Ray jobs (`ray job submit`) run in a copy of the working dir: this names
        # the repository the cluster serves from.
        "FLEET_REPOSITORY": settings.repository,
        "FLEET_DATA_DIR": settings.data_dir,
        "FLEET_TRAIN_STORAGE": settings.train_storage_path,
        # A job's `python` is this installation's interpreter (its venv), whatever the user's PATH.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        # Serve's default (30 s) makes every shutdown and rolling update wait that long;
        # HAProxy is reconfigured within about a second of a replica leaving. With fleet's own
        # listener nothing needs it: the listener's drain moves clients to the other replicas.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
            str(settings.ingress_drain_period_s if settings.http_server == "serve" else 0.5),
        # Ray starts workers at nice 15; replicas answering HTTP must not lose the CPU
        # to every other process on the node (the load generator, a Triton next door).
        "RAY_worker_niceness": "0",
    }
    if settings.autoscales:
        env.update(METRIC_ENV)  # the autoscaler's metrics within a second, not Serve's 10 s
    if settings.haproxy and settings.http_server == "serve":
        # HAProxy's stats/metrics ports default to fixed numbers; two clusters on one
        # machine (a user's and the tests') must not collide.
        spare = iter(free_ports(2))
        for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            env[var] = os.environ.get(var) or str(next(spare))
    return env


def replica_env(env: dict[str, str]) -> dict[str, str]:
    """The entries of `env` (a `ray_env`) that fleet's replicas read themselves."""
    return {k: env[k] for k in _REPLICA_ENV if env.get(k) is not None}


def fleet_app(settings: FleetSettings, options, env_vars: dict[str, str] | None = None):
    """fleet's Serve application for `settings` (`options`: its serving options), on the Ray cluster this process
    is connected to, with the monitor started first: its rollout controller writes each model's rollout.json
    (the stable version) before a replica chooses what to serve, so a version published meanwhile rolls out as
    a canary."""
    import ray

    from serving.app import build_app
    from serving.monitor import get_monitor

    ray.get(get_monitor(options.to_dict()).ping.remote())
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    return build_app(options, settings.deployment_options(gpus_available=gpus), env_vars=env_vars)


_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def enable_request_migration() -> bool:
    """Ask the kernel to hand connections queued on a closing SO_REUSEPORT socket to the other replicas.

    Without it (`net.ipv4.tcp_migrate_req`, Linux 5.14+), a connection that reached a
    draining replica's accept queue just before the replica closed its socket is reset.
    Best effort: True when it is on (it is per network namespace and needs the right to set it).
    """
    try:
        with open(_MIGRATE_REQ) as f:
            if f.read().strip() == "1":
                return True
        with open(_MIGRATE_REQ, "w") as f:
            f.write("1")
        return True
    except OSError as exc:
        _log.warning("could not set net.ipv4.tcp_migrate_req=1 (%s): connections queued on a draining "
                     "replica's socket may be reset during rolling updates; set it with sysctl", exc)
        return False


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LocalCluster:
    """Start/stop a fleet cluster owned by this process: a Ray head of its own, or (`settings.address`) fleet's
    application and monitor deployed into a running Ray cluster, which `stop` then leaves running."""

    settings: FleetSettings
    started: bool = field(default=False, init=False)
    attached: bool = field(default=False, init=False)  # deployed into a Ray cluster this process did not start
    url: str = field(default="", init=False)  # where fleet answers, once started
    dashboard_url: str = field(default="", init=False)  # the Ray cluster's dashboard and job server

    def start(self) -> None:
        """Start Ray (or attach to `settings.address`) and Serve, deploy the app; returns once HTTP answers ready."""
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions

        from serving.app import APP_NAME

        s = self.settings
        if s.host != "node" and not port_is_free(s.host, s.port):
            # fleet's listeners share the port with SO_REUSEPORT: check nobody else has it.
            raise RuntimeError(f"port {s.port} on {s.host} is in use; pick another with --port")
        if s.host != "node" and s.grpc_port and not port_is_free(s.host, s.grpc_port):
            raise RuntimeError(f"gRPC port {s.grpc_port} on {s.host} is in use; pick another with --grpc-port "
                               "(0: no gRPC)")
        env = ray_env(s)
        os.environ.update(env)
        if s.http_server == "fleet":
            enable_request_migration()
        if s.address:
            # The cluster's processes started with their own environment: what fleet's replicas read goes with
            # them (runtime_env), and the job server is the cluster's.
            from cluster.jobs import auth_env

            auth_env()  # the cluster's token (~/.ray/auth_token) with its token authentication on
            context = ray.init(address=s.address, namespace="fleet", logging_level=logging.WARNING,
                               log_to_driver=False)
            self.attached = True
            self.dashboard_url = f"http://{context.dashboard_url}" if context.dashboard_url else s.dashboard_url
        else:
            ray.init(
                # Always a new cluster of its own: never attach to another one this machine runs
                # (`ray start` leaves its address where a bare ray.init() would pick it up).
                address="local",
                num_cpus=s.num_cpus or os.cpu_count(),
                num_gpus=s.num_gpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=s.dashboard_port,
                namespace="fleet",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            self.dashboard_url = s.dashboard_url
        self.started = True
        host = ray.util.get_node_ip_address() if s.host == "node" else s.host
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{s.port}"
        if s.http_server == "fleet":
            # The ingress replicas listen on the port themselves; Serve's proxy stays off.
            serve.start(proxy_location="Disabled", http_options=HTTPOptions(host=host, port=s.port))
        else:
            serve.start(http_options=HTTPOptions(host=host, port=s.port))
        options = s.serving_options()
        if self.attached:
            options = dataclasses.replace(options, dashboard_url=self.dashboard_url)
        app = fleet_app(s, options, env_vars=replica_env(env) if self.attached else None)
        # One log line per request would cost more than the request itself.
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
        self.wait_ready(s.startup_timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until `GET /v2/health/ready` answers 200 through the public port."""
        deadline = time.monotonic() + timeout_s
        url = f"{self.url or self.settings.url}/v2/health/ready"
        while time.monotonic() < deadline:
            if _http_ok(url):
                return
            time.sleep(0.25)
        raise TimeoutError(f"fleet did not become ready at {url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Shut Serve and Ray down (idempotent)."""
        if not self.started:
            return
        import ray
        from ray import serve

        if self.attached:  # what fleet deployed goes; the cluster, Serve and other applications stay
            from serving.app import APP_NAME
            from serving.monitor import MONITOR_NAME, MONITOR_NAMESPACE

            try:
                serve.delete(APP_NAME)
            except Exception as exc:  # noqa: BLE001 - gone already
                _log.warning("serve delete %s: %s", APP_NAME, exc)
            try:
                ray.kill(ray.get_actor(MONITOR_NAME, namespace=MONITOR_NAMESPACE))
            except ValueError:  # no monitor (it never started)
                pass
            ray.shutdown()  # this process's connection only
            self.started = False
            return
        try:
            serve.shutdown()
        except Exception as exc:  # the cluster may already be half gone (Ctrl-C)
            _log.warning("serve shutdown: %s", exc)
        ray.shutdown()
        self.started = False
