"""fleet's configuration: defaults < `fleet.yaml` < env `FLEET_*` < CLI flags.

    # fleet.yaml (or the file FLEET_CONFIG names)
    repository: model_repository
    port: 8000
    ingress_replicas: 1
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict,
                               YamlConfigSettingsSource)

from serving.app import DeploymentOptions
from serving.autoscale import AutoscalePolicy
from serving.auth import as_digest
from serving.monitoring.alerts import audit_dir_for
from serving.options import ServingOptions
from serving.storage import check_root, is_uri
from serving.telemetry.tracing import check_otlp_endpoint

__all__ = ["FleetSettings", "load_settings", "SECRET_ENV"]

# Environment variables holding secrets in plain text (the server's keys and token, the CLI's own key): read by
# the CLI, never handed to the cluster's processes (the settings they get carry digests).
SECRET_ENV = ("FLEET_API_KEYS", "FLEET_ADMIN_TOKEN", "FLEET_API_KEY")


class FleetSettings(BaseSettings):
    """Everything `fleet` and `make serve` can be told; units in the names."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="forbid", validate_default=True)

    repository: str = Field("model_repository", description="model repository: a path or a pyarrow.fs URI")
    host: str = Field("127.0.0.1", description="the address the ingress replicas listen on: an address, 0.0.0.0 "
                      "(every interface), or `node`: each replica its own node's address (a multi-node cluster)")
    address: str | None = Field(None, description="a running Ray cluster to deploy into (`ray start`'s address, or "
                                "`auto`) instead of starting one; `fleet down` then removes only what fleet deployed")
    ingress_per_node: int | None = Field(None, ge=1, description="ingress replicas on every node that takes "
                                         "traffic (see ingress_node_labels), instead of ingress_replicas in all")
    ingress_node_labels: dict[str, str] = Field(default_factory=dict, description="with ingress_per_node: only "
                                                "nodes with these Ray labels take traffic (e.g. {fleet/ingress: 'yes'})")
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="KServe v2 gRPC (inference.GRPCInferenceService), "
                           "served by every ingress replica on this port (SO_REUSEPORT); 0: no gRPC")
    grpc_transport: Literal["native", "grpcio"] = Field(
        "native", description="native: HTTP/2 and gRPC framing in fleet's C++ transport (native._h2, libnghttp2; "
        "grpc.aio when it is not built or FLEET_PURE_PYTHON=1); grpcio: grpc.aio")
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
    ingress_autoscaling: AutoscalePolicy | None = Field(
        None, description="scale the ingress replicas between min_replicas and max_replicas on the requests in "
        "flight on their own sockets, target_load per replica (with upscale_delay_s, downscale_delay_s, "
        "look_back_s), instead of a fixed ingress_replicas; e.g. {min_replicas: 1, max_replicas: 3, target_load: 8}")
    worker_autoscaling: AutoscalePolicy | None = Field(
        None, description="the same for split models' worker replicas, on the batches in flight to them "
        "(target_load: batches per replica), instead of a fixed worker_replicas")
    worker_threads: int = Field(1, ge=1, description="torch intra-op threads per worker replica")
    max_inflight_batches: int = Field(2, ge=1, description="per model version and ingress replica")
    max_queue_size: int = Field(4096, ge=1, description="for configs that leave max_queue_size unbounded")
    max_request_bytes: int = Field(64 << 20, ge=1024)
    max_tensor_elements: int = Field(1 << 26, ge=1, description="elements of one input tensor, checked on its "
                                     "declared shape before its data is read (400 past it)")
    max_batch_rows: int = Field(0, ge=0, description="batch rows of one request, on top of each model's "
                                "max_batch_size (400 past it); 0: the model's max_batch_size only")
    max_string_bytes: int = Field(1 << 20, ge=1, description="UTF-8 bytes of each BYTES element (JSON or "
                                  "binary) and of every other string of a request: id, names, parameters (400 past it)")
    max_json_depth: int = Field(32, ge=1, le=512, description="arrays and objects open at once anywhere in a "
                                "request's JSON, checked before it is parsed (400 past it); the parsers stop at 1024 anyway")
    default_timeout_ms: float = Field(0.0, ge=0, description="queue timeout of models whose config sets no "
                                      "default_timeout_microseconds: a request still queued past it is answered 504 "
                                      "without being computed; a request's parameters.timeout (µs) may shorten it; "
                                      "0: none")
    response_cache_bytes: int = Field(0, ge=0, description="the response cache of each ingress replica: answers "
                                      "of the models whose config.pbtxt says response_cache { enable: true } are "
                                      "kept by request (model, version, inputs, outputs asked, parameters) up to "
                                      "this many bytes, least recently used evicted first; an identical request "
                                      "is answered without being computed. 0: no cache, whatever the models say")
    max_connections: int = Field(4096, ge=1, description="open HTTP connections per ingress replica; one more "
                                 "is answered 503 with Retry-After and closed")
    drain_timeout_s: float = Field(10.0, ge=0, description="a stopping ingress replica answers what it has read "
                                   "and what is queued within this long (each), then exits")
    worker_retry_timeout_s: float = Field(10.0, ge=0, description="a batch whose worker replica died is sent "
                                          "once more to another replica, waiting at most this long; 0: no retry")
    metrics_push_interval_s: float = Field(1.0, gt=0)
    startup_timeout_s: float = Field(180.0, gt=0)
    ingress_drain_period_s: float = Field(
        5.0, ge=0, description="with http_server=serve: a stopping ingress replica keeps answering this long "
        "while HAProxy deregisters it (fleet's own listener drains by itself: drain_timeout_s)"
    )
    version_poll_interval_s: float = Field(
        5.0, ge=0, description="how often each replica holding a model looks for newly published, accepted "
        "versions and switches to them in place (±20 % jitter, so replicas switch one after another); 0: never"
    )
    version_retire_grace_s: float = Field(
        15.0, ge=0, description="a version that is no longer served stays loaded this long, so requests "
        "already routed to it still get answered"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys inference needs (`Authorization: Bearer <key>`); env "
        "FLEET_API_KEYS comma-separated; a `sha256:<hex>` entry is a key's digest. Held as SHA-256 digests "
        "once read. Empty (and no api_keys_file): inference needs no key"
    )
    api_keys_file: str | None = Field(None, description="a file of more API keys, one a line ('#' comments); "
                                      "read at start-up")
    admin_token: str | None = Field(None, description="the token the admin endpoints (model load/unload, version "
                                    "pins) need; held as its SHA-256 digest. None: the admin endpoints are off (403)")
    rate_limit_rps: float | None = Field(None, gt=0, description="requests per second per API key (per client "
                                         "address when no keys are configured) in each ingress replica, so a "
                                         "client's cluster-wide limit is up to replicas x this; None: no limit")
    rate_limit_burst: int | None = Field(None, ge=1, description="requests a client may send at once above the "
                                         "rate (default: one second's worth)")
    rate_limit_max_clients: int = Field(10_000, ge=1, description="clients tracked per ingress replica; the "
                                        "least recently seen are forgotten first")
    state_dir: str = Field(".fleet", description="where `fleet up` keeps its pid, state and log")
    data_dir: str = Field("data", description="training data of the cluster's jobs: example parquet files, "
                          "logged traffic under traffic/<model>/ (FLEET_DATA_DIR in the jobs); a path or a "
                          "pyarrow.fs URI (s3://bucket/data?region=...), the audit files then in <state_dir>/audit")
    train_storage: str | None = Field(None, description="where training jobs keep checkpoints "
                                      "(FLEET_TRAIN_STORAGE in the jobs; default <state_dir>/train)")
    # Monitoring (serving/monitoring/): the prediction log, feedback, drift, quality, alerts, retraining.
    log_predictions: bool = Field(True, description="write every answered inference (each model's "
                                  "fleet.log.sample of them) to <data_dir>/traffic/<model>/ as Parquet, and "
                                  "take labels at /v2/models/{m}/feedback into <data_dir>/labels/<model>/")
    log_flush_rows: int = Field(10_000, ge=1, description="an ingress replica writes a log file every this many "
                                "rows, or every log_flush_interval_s, whichever comes first")
    log_flush_interval_s: float = Field(5.0, gt=0)
    log_buffer_rows: int = Field(200_000, ge=1, description="log rows an ingress replica holds while the sink is "
                                 "slow or failing; a batch past it is dropped and counted "
                                 "(fleet_prediction_log_dropped_total), serving goes on")
    log_buffer_bytes: int = Field(256 << 20, ge=1 << 16, description="the same bound in bytes")
    max_feedback_labels: int = Field(100_000, ge=1, description="labels in one feedback body (413 past it)")
    monitor_interval_s: float = Field(1.0, gt=0, description="how often the monitor judges drift and joins labels")
    label_window_days: float = Field(14.0, gt=0, description="a label joins its prediction up to this many days "
                                     "after it; later ones are counted as unmatched")
    drift_window_rows: int = Field(10_000, ge=100, description="the drift rows window: the latest this many rows")
    drift_window_s: float = Field(300.0, gt=0, description="the drift time window: the last this many seconds")
    drift_false_alarm_rows: float = Field(864e6, ge=1e4, description="the drift alarms' false-alarm target: at most "
                                          "one per this many rows of a model version on stable traffic (default: "
                                          "one a day at 10,000 rows/s)")
    quality_window_labels: int = Field(10_000, ge=10, description="online quality over the latest this many "
                                       "labelled predictions ...")
    quality_window_s: float = Field(3600.0, gt=0, description="... and over the predictions of the last this "
                                    "many seconds")
    alert_webhook_url: str | None = Field(None, description="the monitor POSTs each alarm (raised, cleared) as "
                                          "JSON with its evidence here")
    alert_webhook_token_file: str | None = Field(None, description="a file holding a bearer token for the "
                                                 "webhook (read when sending: the token is never in a config, "
                                                 "state file or environment)")
    retrain_after_s: float | None = Field(1800.0, gt=0, description="a drift or quality alarm on the serving "
                                          "version that persists this long makes the monitor submit "
                                          "training.retrain for the model; None: never")
    retrain_cooldown_s: float = Field(6 * 3600.0, ge=0, description="at least this long between two retrains "
                                      "the monitor submits for one model")
    train_nice: int = Field(10, ge=0, le=19, description="the niceness of every process of the training jobs "
                            "fleet submits (`fleet train`, the monitor's retrains): below the serving replicas "
                            "on the nodes they share; 0: as Ray starts them")
    # Logs and tracing (serving/telemetry/logs.py, serving/telemetry/tracing.py).
    log_format: Literal["text", "json"] = Field("text", description="fleet's log lines in every replica's log "
                                                "(Ray's logs/serve/ folder) and the monitor's: text, or json (one "
                                                "object a line with ts, level, logger, message, request_id, "
                                                "trace_id, model, version, event)")
    tracing_sample_ratio: float = Field(0.0, ge=0, le=1, description="OpenTelemetry tracing: the share of requests "
                                        "traced (spans parse, queue, batch, preprocess, compute, encode); a "
                                        "request with a sampled W3C traceparent is always traced, and every "
                                        "answer to one carries a traceparent. 0: tracing off (costs nothing)")
    otlp_endpoint: str | None = Field(None, description="where traced spans go: an OpenTelemetry collector's "
                                      "OTLP/HTTP endpoint, http(s)://host:4318[/path] (/v1/traces when no path); "
                                      "None: JSON lines in <state_dir>/traces/<component>-<pid>.jsonl on each "
                                      "replica's node")

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_otlp_endpoint(value)

    @field_validator("host")
    @classmethod
    def _listen_host(cls, value: str) -> str:
        import ipaddress

        if value != "node":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"host must be an IP address, 0.0.0.0 or `node`, got {value!r}") from None
        return value

    @field_validator("repository")
    @classmethod
    def _absolute_repository(cls, value: str) -> str:
        # Jobs and replicas run in other working directories: pin local paths down; a URI is checked offline.
        return check_root(value, "repository") if is_uri(value) else str(Path(value).expanduser().resolve())

    @field_validator("alert_webhook_token_file")
    @classmethod
    def _absolute_file(cls, value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    @field_validator("data_dir", "state_dir", "train_storage")
    @classmethod
    def _absolute_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A job runs in Ray's copy of the working dir: a relative path would point into that copy.
        if value is not None and is_uri(value):
            if info.field_name == "state_dir":
                raise ValueError(f"state_dir must be a local folder (pid, logs, and the audit files when data_dir "
                                 f"is on an object store), got {value!r}")
            return check_root(value, info.field_name)  # the data folder or checkpoints on an object store
        return None if value is None else str(Path(value).expanduser().resolve())

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        # FLEET_API_KEYS=key1,key2 (NoDecode: not JSON)
        return [k for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def _hash_keys(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(as_digest(k) for k in value))

    @field_validator("admin_token")
    @classmethod
    def _hash_admin_token(cls, value: str | None) -> str | None:
        return None if value is None else as_digest(value)

    @model_validator(mode="after")
    def _one_way_to_count_replicas(self) -> "FleetSettings":
        for kind, fixed in (("ingress", self.ingress_replicas), ("worker", self.worker_replicas)):
            if getattr(self, f"{kind}_autoscaling") is not None and fixed is not None:
                raise ValueError(f"set either {kind}_replicas ({fixed}) or {kind}_autoscaling, not both")
        if self.ingress_autoscaling is not None and self.ingress_per_node is not None:
            raise ValueError("set either ingress_per_node or ingress_autoscaling, not both")
        return self

    @property
    def autoscales(self) -> bool:
        return self.ingress_autoscaling is not None or self.worker_autoscaling is not None

    @model_validator(mode="after")
    def _read_keys_file(self) -> "FleetSettings":
        if self.api_keys_file:
            path = Path(self.api_keys_file).expanduser().resolve()
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"api_keys_file {str(path)!r} cannot be read: {exc}") from None
            keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            self.api_keys = list(dict.fromkeys([*self.api_keys, *(as_digest(k) for k in keys)]))
            self.api_keys_file = str(path)
        return self

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
            max_batch_rows=self.max_batch_rows,
            max_string_bytes=self.max_string_bytes,
            max_json_depth=self.max_json_depth,
            default_timeout_ms=self.default_timeout_ms,
            response_cache_bytes=self.response_cache_bytes,
            metrics_push_interval_s=self.metrics_push_interval_s,
            max_connections=self.max_connections,
            drain_timeout_s=self.drain_timeout_s,
            worker_retry_timeout_s=self.worker_retry_timeout_s,
            worker_threads=self.worker_threads,
            startup_timeout_s=self.startup_timeout_s,
            listen_host=self.host,
            listen_port=self.port if self.http_server == "fleet" else None,
            grpc_port=self.grpc_port or None,
            grpc_transport=self.grpc_transport,
            version_poll_interval_s=self.version_poll_interval_s,
            version_retire_grace_s=self.version_retire_grace_s,
            api_key_digests=tuple(self.api_keys),
            admin_token_digest=self.admin_token,
            rate_limit_rps=self.rate_limit_rps,
            rate_limit_burst=self.rate_limit_burst or max(1, math.ceil(self.rate_limit_rps or 1)),
            rate_limit_max_clients=self.rate_limit_max_clients,
            data_dir=self.data_dir if self.log_predictions else None,
            audit_dir=audit_dir_for(self.data_dir if self.log_predictions else None, self.state_dir),
            log_flush_rows=self.log_flush_rows,
            log_flush_interval_s=self.log_flush_interval_s,
            log_buffer_rows=self.log_buffer_rows,
            log_buffer_bytes=self.log_buffer_bytes,
            max_feedback_labels=self.max_feedback_labels,
            monitor_interval_s=self.monitor_interval_s,
            label_window_days=self.label_window_days,
            drift_window_rows=self.drift_window_rows,
            drift_window_s=self.drift_window_s,
            drift_false_alarm_rows=self.drift_false_alarm_rows,
            quality_window_labels=self.quality_window_labels,
            quality_window_s=self.quality_window_s,
            alert_webhook_url=self.alert_webhook_url,
            alert_webhook_token_file=self.alert_webhook_token_file,
            retrain_after_s=self.retrain_after_s,
            retrain_cooldown_s=self.retrain_cooldown_s,
            train_nice=self.train_nice,
            dashboard_url=self.dashboard_url,
            log_format=self.log_format,
            tracing_sample_ratio=self.tracing_sample_ratio,
            otlp_endpoint=self.otlp_endpoint,
            trace_dir=str(Path(self.state_dir) / "traces") if self.tracing_sample_ratio > 0 else None,
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
            ingress_per_node=self.ingress_per_node,
            ingress_node_labels=tuple(sorted(self.ingress_node_labels.items())),
            ingress_autoscaling=self.ingress_autoscaling,
            worker_autoscaling=self.worker_autoscaling,
        )


def load_settings(**overrides: Any) -> FleetSettings:
    """Settings from fleet.yaml and the environment, with `overrides` (CLI flags) on top.

    Raises ValueError naming the bad value.
    """
    return FleetSettings(**{k: v for k, v in overrides.items() if v is not None})
