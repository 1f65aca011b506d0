"""fleet's configuration: defaults < `fleet.yaml` < env `FLEET_*` < CLI flags.

    # fleet.yaml (or the file FLEET_CONFIG names)
    repository: model_repository
    port: 8000
    ingress_replicas: 1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from serving.app import DeploymentOptions
from serving.options import ServingOptions

__all__ = ["FleetSettings", "load_settings"]


class FleetSettings(BaseSettings):
    """Everything `fleet` and `make serve` can be told; units in the names."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="forbid", validate_default=True)

    repository: str = Field("model_repository", description="model repository: a path or a pyarrow.fs URI")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard and job server")
    num_cpus: int | None = Field(None, ge=1, description="Ray logical CPUs (default: the machine's)")
    num_gpus: int | None = Field(None, ge=0)
    http_server: Literal["fleet", "serve"] = Field(
        "fleet",
        description="fleet: each ingress replica listens on the port itself (SO_REUSEPORT); "
        "serve: Ray Serve's HAProxy ingress or Python proxy in front",
    )
    haproxy: bool = Field(True, description="with http_server=serve: HAProxy instead of Serve's Python proxy")
    throughput_optimized: bool = Field(True, description="RAY_SERVE_THROUGHPUT_OPTIMIZED")
    placement: Literal["auto", "colocated", "split"] = Field(
        "auto", description="where models run: in the ingress replicas, in worker deployments, or auto "
        "(split for GPU models, colocated otherwise)"
    )
    ingress_replicas: int | None = Field(None, ge=1, description="default: one per CPU, at most 8")
    ingress_num_cpus: float = Field(0.25, ge=0)
    worker_num_cpus: float = Field(0.25, ge=0)
    worker_replicas: int | None = Field(None, ge=1, description="default: the config's instance_group count")
    worker_threads: int = Field(1, ge=1, description="torch intra-op threads per worker replica")
    max_inflight_batches: int = Field(2, ge=1, description="per model version and ingress replica")
    max_queue_size: int = Field(4096, ge=1, description="for configs that leave max_queue_size unbounded")
    max_request_bytes: int = Field(64 << 20, ge=1024)
    max_tensor_elements: int = Field(1 << 26, ge=1)
    max_connections: int = Field(4096, ge=1, description="open HTTP connections per ingress replica; one more "
                                 "is answered 503 with Retry-After and closed")
    drain_timeout_s: float = Field(10.0, ge=0, description="a stopping ingress replica answers what it has read "
                                   "and what is queued within this long (each), then exits")
    metrics_push_interval_s: float = Field(1.0, gt=0)
    startup_timeout_s: float = Field(180.0, gt=0)
    ingress_drain_period_s: float = Field(
        5.0, ge=0, description="a stopping ingress replica keeps answering this long while HAProxy deregisters it"
    )
    version_poll_interval_s: float = Field(
        5.0, ge=0, description="how often each replica holding a model looks for newly published, accepted "
        "versions and switches to them in place (±20 % jitter, so replicas switch one after another); 0: never"
    )
    version_retire_grace_s: float = Field(
        15.0, ge=0, description="a version that is no longer served stays loaded this long, so requests "
        "already routed to it still get answered"
    )
    state_dir: str = Field(".fleet", description="where `fleet up` keeps its pid, state and log")
    data_dir: str = Field("data", description="training data of the cluster's jobs: example parquet files, "
                          "logged traffic under traffic/<model>/ (FLEET_DATA_DIR in the jobs)")
    train_storage: str | None = Field(None, description="where training jobs keep checkpoints "
                                      "(FLEET_TRAIN_STORAGE in the jobs; default <state_dir>/train)")

    @field_validator("repository")
    @classmethod
    def _absolute_repository(cls, value: str) -> str:
        # Jobs and replicas run in other working directories: pin local paths down.
        return value if "://" in value else str(Path(value).expanduser().resolve())

    @field_validator("data_dir", "state_dir", "train_storage")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        # A job runs in Ray's copy of the working dir: a relative path would point into that copy.
        return None if value is None else str(Path(value).expanduser().resolve())

    @property
    def train_storage_path(self) -> str:
        return self.train_storage or str(Path(self.state_dir) / "train")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get("FLEET_CONFIG", "fleet.yaml")
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def serving_options(self) -> ServingOptions:
        return ServingOptions(
            repository=self.repository,
            max_inflight_batches=self.max_inflight_batches,
            max_queue_size=self.max_queue_size,
            max_request_bytes=self.max_request_bytes,
            max_tensor_elements=self.max_tensor_elements,
            metrics_push_interval_s=self.metrics_push_interval_s,
            max_connections=self.max_connections,
            drain_timeout_s=self.drain_timeout_s,
            worker_threads=self.worker_threads,
            startup_timeout_s=self.startup_timeout_s,
            listen_host=self.host,
            listen_port=self.port if self.http_server == "fleet" else None,
            version_poll_interval_s=self.version_poll_interval_s,
            version_retire_grace_s=self.version_retire_grace_s,
        )

    def deployment_options(self, gpus_available: bool) -> DeploymentOptions:
        return DeploymentOptions(
            # One HTTP event loop per CPU, up to 8 (each replica holds the colocated models).
            ingress_replicas=self.ingress_replicas or min(8, max(1, self.num_cpus or os.cpu_count() or 1)),
            ingress_num_cpus=self.ingress_num_cpus,
            worker_num_cpus=self.worker_num_cpus,
            worker_replicas=self.worker_replicas,
            gpus_available=gpus_available,
            placement=self.placement,
        )


def load_settings(**overrides: Any) -> FleetSettings:
    """Settings from fleet.yaml and the environment, with `overrides` (CLI flags) on top.

    Raises ValueError naming the bad value.
    """
    return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})
