"""Serving options handed from the cluster's config to ingress and worker replicas."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ServingOptions"]


@dataclass(frozen=True)
class ServingOptions:
    """What the request path needs to know; built from `cluster.config.FleetSettings`."""

    repository: str
    max_inflight_batches: int = 2  # per model version and ingress replica
    max_queue_size: int = 4096  # applied when a config's max_queue_size is 0 (unbounded)
    max_request_bytes: int = 64 << 20
    max_tensor_elements: int = 1 << 26
    # Request limits (serving/limits.py), each refused with a 400 naming the setting; 0: none.
    max_batch_rows: int = 0  # rows of one request, on top of the model's max_batch_size
    max_string_bytes: int = 1 << 20  # each BYTES element, id, name, parameter key or value
    max_json_depth: int = 32  # arrays and objects open at once in a request's JSON
    # Queue timeout for models whose config sets no default_timeout_microseconds (0: none).
    default_timeout_ms: float = 0.0
    # The response cache of each ingress replica (serving/cache.py), for models that enable it; 0: none.
    response_cache_bytes: int = 0
    metrics_push_interval_s: float = 1.0
    status_refresh_interval_s: float = 2.0
    worker_threads: int = 1
    startup_timeout_s: float = 120.0
    # fleet's own HTTP listener in each ingress replica (None: Serve's proxy/HAProxy).
    listen_host: str = "127.0.0.1"
    listen_port: int | None = None
    grpc_port: int | None = None  # KServe v2 gRPC in each ingress replica (serving/grpc/), None: none
    grpc_transport: str = "native"  # "native": native._h2 when built (else grpc.aio); "grpcio": grpc.aio
    drain_timeout_s: float = 10.0  # requests in flight get this long at shutdown
    max_connections: int = 4096  # per ingress replica's listener; one more is answered 503
    # A batch whose worker replica died is sent once more, waiting at most this long (and its deadline).
    worker_retry_timeout_s: float = 10.0
    # Live version pickup (serving/versions.py): each replica holding a model polls the repository
    # this often (±20 % jitter; 0: never, the versions stay those loaded at start) ...
    version_poll_interval_s: float = 5.0
    # ... and keeps a version that left the served set loaded this long before closing it.
    version_retire_grace_s: float = 15.0
    # Auth (serving/auth.py): SHA-256 digests ("sha256:<hex>") only, never a key itself.
    api_key_digests: tuple[str, ...] = ()  # empty: inference needs no key
    admin_token_digest: str | None = None  # None: the admin endpoints are off (403)
    # Token bucket per key (per client address without keys) in each ingress replica; None: no limit.
    rate_limit_rps: float | None = None
    rate_limit_burst: int = 1
    rate_limit_max_clients: int = 10_000  # buckets kept per ingress replica (idle ones dropped first)
    # Monitoring (serving/monitoring/): where the prediction log and labels go (None: nothing is logged): a
    # local folder or a pyarrow.fs URI (serving/storage.py) ...
    data_dir: str | None = None
    # ... and the audit files (JSON lines, appended): None for <data_dir>/audit; a local folder when data_dir
    # is on an object store, which cannot append.
    audit_dir: str | None = None
    log_flush_rows: int = 10_000  # a replica writes a file every this many rows ...
    log_flush_interval_s: float = 5.0  # ... or this often, whichever comes first
    log_buffer_rows: int = 200_000  # rows a replica holds while the sink is slow; past it they are dropped, counted
    log_buffer_bytes: int = 256 << 20
    max_feedback_labels: int = 100_000  # labels in one feedback body
    # ... and what the monitor does with it (serving/monitoring/engine.py).
    monitor_interval_s: float = 1.0
    label_window_days: float = 14.0
    drift_window_rows: int = 10_000
    drift_window_s: float = 300.0
    drift_false_alarm_rows: float = 864e6
    quality_window_labels: int = 10_000
    quality_window_s: float = 3600.0
    alert_webhook_url: str | None = None
    alert_webhook_token_file: str | None = None
    retrain_after_s: float | None = None  # None: the monitor never submits a retrain
    retrain_cooldown_s: float = 6 * 3600.0
    train_nice: int = 10  # the niceness of the retrain jobs' processes (training/priority.py)
    dashboard_url: str | None = None  # the job server the monitor submits retrains to
    # Logs (serving/telemetry/logs.py) and tracing (serving/telemetry/tracing.py) of every replica.
    log_format: str = "text"  # "text" or "json" (JSON lines)
    tracing_sample_ratio: float = 0.0  # share of requests traced (a client's sampled traceparent always); 0: off
    otlp_endpoint: str | None = None  # http(s)://: OTLP/HTTP, grpc(s)://: OTLP/gRPC; None: JSON lines in trace_dir
    trace_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def telemetry(self) -> dict:
        """The logs and tracing settings alone: what a worker replica is given (`ModelWorker(telemetry=...)`)."""
        return {"log_format": self.log_format, "tracing_sample_ratio": self.tracing_sample_ratio,
                "otlp_endpoint": self.otlp_endpoint, "trace_dir": self.trace_dir}
