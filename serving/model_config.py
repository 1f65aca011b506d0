"""A model's `config.pbtxt` (Triton's ModelConfig) and fleet's frozen view of it.

The text protobuf is parsed and written with `google.protobuf.text_format` and
`tritonclient.grpc.model_config_pb2.ModelConfig`, so a repository laid out for
Triton loads here unchanged and one written here loads in Triton.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.datatypes import config_to_v2, numpy_dtype, v2_to_config
from serving.errors import RepositoryError

__all__ = [
    "ModelConfig",
    "TensorSpec",
    "is_decimal",
    "QueuePolicy",
    "BatchingPolicy",
    "VersionPolicy",
    "ModelSpec",
    "parse_config",
    "format_config",
    "spec_from_config",
    "make_config",
    "node_labels",
]

ModelConfig = mc.ModelConfig

# Platforms/backends fleet runs itself with TorchScript.
_TORCHSCRIPT_PLATFORMS = {"pytorch_libtorch", "torchscript"}
_TORCHSCRIPT_BACKENDS = {"pytorch", "torchscript", ""}
# `parameters` keys fleet reads (Triton ignores unknown keys).
BACKEND_PARAM = "fleet.backend"
TRITON_URL_PARAM = "fleet.triton.url"
TRITON_MODEL_PARAM = "fleet.triton.model"
TRITON_VERSION_PARAM = "fleet.triton.version"
MAX_INFLIGHT_PARAM = "fleet.max_inflight_batches"
# A TorchScript model on the CPU: its batch runs on the event loop, not its thread, while its batches take at most
# this many µs (serving/backends/torchscript.py; 0: always on the thread)
INLINE_PARAM = "fleet.inline_max_us"
PLACEMENT_PARAM = "fleet.placement"  # "colocated" | "split": overrides the cluster's placement for this model
LATENCY_TARGET_PARAM = "latency_target_ms"  # adaptive batching (serving/adaptive.py)
MAX_UTILIZATION_PARAM = "fleet.adaptive.max_utilization"  # adaptive batching: the model's busy share, (0, 1]
FALLBACK_PARAM = "fleet.fallback"  # "<model>[:<version>]" answering when the backend is down (serving/fallback.py)
BREAKER_FAILURES_PARAM = "fleet.breaker.failures"  # failed batches in a row that open the circuit breaker
BREAKER_COOLDOWN_PARAM = "fleet.breaker.cooldown_ms"  # open -> the first probe
BREAKER_MAX_COOLDOWN_PARAM = "fleet.breaker.max_cooldown_ms"  # the cool-down doubles per failed probe up to this
# "key=value,...": a split model's worker replicas go to nodes with these Ray labels when one has room
# (`ray start --labels fleet-role=worker`), and to any node otherwise (a lost worker node's replicas
# are re-placed on the others).
PREFER_LABELS_PARAM = "fleet.worker.prefer_labels"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: v2 datatype and dims without the batch dimension (-1 = any)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)

    def metadata(self, max_batch_size: int) -> dict:
        """The tensor as `GET /v2/models/{m}` describes it (batch dim shown as -1)."""
        shape = ([-1] if max_batch_size > 0 else []) + list(self.dims)
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy. 0 means "no limit" for both fields, as in Triton."""

    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = True


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic_batching block; `enabled` is False when the block is absent."""

    enabled: bool = False
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    queue: QueuePolicy = QueuePolicy()


@dataclass(frozen=True)
class VersionPolicy:
    """Which published versions are served: the latest N, specific ones, or all."""

    kind: str = "latest"  # "latest" | "specific" | "all"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of `available`, ascending."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if self.num_versions > 0 else []


@dataclass(frozen=True)
class ModelSpec:
    """fleet's read-only view of a model's config.pbtxt."""

    name: str
    backend: str  # "torchscript" | "triton"
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingPolicy = BatchingPolicy()
    version_policy: VersionPolicy = VersionPolicy()
    instance_count: int = 1
    instance_kind: str = "auto"  # "auto" | "cpu" | "gpu"
    default_model_filename: str = "model.pt"
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # `response_cache { enable: true }`: answers are kept by request (serving/cache.py) when the server has
    # a cache (response_cache_bytes > 0); without one the model computes every request, as in Triton.
    response_cache: bool = False

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    @property
    def triton_url(self) -> str | None:
        return self.parameters.get(TRITON_URL_PARAM)


def parse_config(text: str, *, source: str = "config.pbtxt") -> mc.ModelConfig:
    """Parse a text-protobuf ModelConfig; RepositoryError says where it is wrong."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: {exc}") from exc
    return config


def format_config(config: mc.ModelConfig) -> str:
    """The text-protobuf form Triton reads."""
    return text_format.MessageToString(config)


def _tensor(t, *, source: str) -> TensorSpec:
    try:
        datatype = config_to_v2(mc.DataType.Name(t.data_type))
    except ValueError as exc:
        raise RepositoryError(f"{source}: tensor {t.name!r}: {exc}") from exc
    dims = tuple(int(d) for d in t.dims)
    if any(d < -1 or d == 0 for d in dims):
        raise RepositoryError(f"{source}: tensor {t.name!r}: dims must be positive or -1, got {list(dims)}")
    return TensorSpec(t.name, datatype, dims, bool(getattr(t, "optional", False)))


def _backend_of(config: mc.ModelConfig, params: Mapping[str, str], source: str) -> str:
    chosen = params.get(BACKEND_PARAM, "")
    if chosen:
        if chosen not in ("torchscript", "triton"):
            raise RepositoryError(f"{source}: {BACKEND_PARAM} must be 'torchscript' or 'triton', got {chosen!r}")
        if chosen == "triton" and not params.get(TRITON_URL_PARAM):
            raise RepositoryError(f"{source}: a triton-backed model needs parameters {{ key: {TRITON_URL_PARAM!r} }}")
        return chosen
    if params.get(TRITON_URL_PARAM):
        return "triton"
    if config.platform in _TORCHSCRIPT_PLATFORMS or (not config.platform and config.backend in _TORCHSCRIPT_BACKENDS):
        return "torchscript"
    raise RepositoryError(
        f"{source}: platform {config.platform!r} / backend {config.backend!r} is not served by fleet; "
        f"use platform 'pytorch_libtorch' or set parameters {BACKEND_PARAM!r} to 'triton' with {TRITON_URL_PARAM!r}"
    )


def _version_policy(config: mc.ModelConfig) -> VersionPolicy:
    if not config.HasField("version_policy"):
        return VersionPolicy()
    which = config.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(kind="all")
    if which == "specific":
        return VersionPolicy(kind="specific", versions=tuple(int(v) for v in config.version_policy.specific.versions))
    return VersionPolicy(kind="latest", num_versions=max(1, int(config.version_policy.latest.num_versions)))


def _batching(config: mc.ModelConfig, source: str) -> BatchingPolicy:
    if not config.HasField("dynamic_batching"):
        return BatchingPolicy()
    db = config.dynamic_batching
    preferred = tuple(sorted(int(s) for s in db.preferred_batch_size))
    if any(s <= 0 or (config.max_batch_size and s > config.max_batch_size) for s in preferred):
        raise RepositoryError(
            f"{source}: preferred_batch_size {list(preferred)} must lie in 1..max_batch_size ({config.max_batch_size})"
        )
    q = db.default_queue_policy
    queue = QueuePolicy(
        max_queue_size=int(q.max_queue_size),
        default_timeout_us=int(q.default_timeout_microseconds),
        allow_timeout_override=bool(q.allow_timeout_override) or not db.HasField("default_queue_policy"),
    )
    return BatchingPolicy(
        enabled=True,
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preferred_batch_sizes=preferred,
        queue=queue,
    )


def _instances(config: mc.ModelConfig) -> tuple[int, str]:
    if not config.instance_group:
        return 1, "auto"
    count = sum(max(1, int(g.count)) for g in config.instance_group)
    kinds = {mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
    if "KIND_GPU" in kinds:
        return count, "gpu"
    if kinds == {"KIND_CPU"}:
        return count, "cpu"
    return count, "auto"


def is_decimal(text: str) -> bool:
    """True for ASCII digits only: what a version number, a length or a count may be spelled with
    (str.isdigit() also takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()


def _check_numeric_params(params: dict[str, str], source: str) -> None:
    for key, kind in ((LATENCY_TARGET_PARAM, float), (MAX_INFLIGHT_PARAM, int), (BREAKER_FAILURES_PARAM, int),
                      (BREAKER_COOLDOWN_PARAM, float), (BREAKER_MAX_COOLDOWN_PARAM, float)):
        raw = params.get(key)
        if raw is None:
            continue
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise RepositoryError(f"{source}: parameter {key!r} must be a positive number, got {raw!r}")
    for key, ok, rule in ((INLINE_PARAM, lambda v: 0 <= v < math.inf, "be a number of µs >= 0"),
                          (MAX_UTILIZATION_PARAM, lambda v: 0 < v <= 1, "lie in (0, 1]")):
        raw = params.get(key)
        if raw is not None and not ok(_float_or_nan(raw)):
            raise RepositoryError(f"{source}: parameter {key!r} must {rule}, got {raw!r}")


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def node_labels(text: str, *, source: str = "config.pbtxt") -> dict[str, str]:
    """Parse `fleet.worker.prefer_labels` ("key=value,key2=value2") into a Ray label selector."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise RepositoryError(f"{source}: parameter {PREFER_LABELS_PARAM!r} must be 'key=value,...', got {text!r}")
        labels[key.strip()] = value.strip()
    if not labels:
        raise RepositoryError(f"{source}: parameter {PREFER_LABELS_PARAM!r} names no label")
    return labels


def spec_from_config(config: mc.ModelConfig, *, name: str | None = None, source: str = "config.pbtxt") -> ModelSpec:
    """Validate a ModelConfig and return fleet's view of it.

    `name` is the model's folder name; Triton lets `config.name` be empty and
    requires it to match the folder otherwise.
    """
    model_name = name or config.name
    if not model_name:
        raise RepositoryError(f"{source}: the model has no name")
    if name and config.name and config.name != name:
        raise RepositoryError(f"{source}: name {config.name!r} does not match the model folder {name!r}")
    if config.max_batch_size < 0:
        raise RepositoryError(f"{source}: max_batch_size must be >= 0")
    if not config.input or not config.output:
        raise RepositoryError(f"{source}: a model needs at least one input and one output")
    params = {k: v.string_value for k, v in config.parameters.items()}
    inputs = tuple(_tensor(t, source=source) for t in config.input)
    outputs = tuple(_tensor(t, source=source) for t in config.output)
    for kind, group in (("input", inputs), ("output", outputs)):
        names = [t.name for t in group]
        if len(set(names)) != len(names):
            raise RepositoryError(f"{source}: duplicate {kind} names in {names}")
    _check_numeric_params(params, source)
    if params.get(PLACEMENT_PARAM, "colocated") not in ("colocated", "split"):
        raise RepositoryError(f"{source}: parameter {PLACEMENT_PARAM!r} must be 'colocated' or 'split', "
                              f"got {params[PLACEMENT_PARAM]!r}")
    if PREFER_LABELS_PARAM in params:
        node_labels(params[PREFER_LABELS_PARAM], source=source)
    count, kind = _instances(config)
    return ModelSpec(
        name=model_name,
        backend=_backend_of(config, params, source),
        platform=config.platform or config.backend,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        batching=_batching(config, source),
        version_policy=_version_policy(config),
        instance_count=count,
        instance_kind=kind,
        default_model_filename=config.default_model_filename or "model.pt",
        parameters=MappingProxyType(params),
        response_cache=config.HasField("response_cache") and bool(config.response_cache.enable),
    )


def make_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    *,
    max_batch_size: int,
    max_queue_delay_us: int = 0,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_size: int = 0,
    default_timeout_us: int = 0,
    instance_count: int = 1,
    parameters: Mapping[str, str] | None = None,
    platform: str = "pytorch_libtorch",
    latest_versions: int = 1,
    instance_kind: str = "KIND_AUTO",
) -> mc.ModelConfig:
    """Build a ModelConfig for a model fleet publishes (TorchScript, dynamic batching)."""
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size)
    for spec, target in [(t, config.input) for t in inputs] + [(t, config.output) for t in outputs]:
        t = target.add()
        t.name = spec.name
        t.data_type = mc.DataType.Value(v2_to_config(spec.datatype))
        t.dims.extend(spec.dims)
        if spec.optional:
            t.optional = True
    config.version_policy.latest.num_versions = latest_versions
    if max_batch_size > 0:
        db = config.dynamic_batching
        db.max_queue_delay_microseconds = max_queue_delay_us
        db.preferred_batch_size.extend(preferred_batch_sizes)
        db.default_queue_policy.max_queue_size = max_queue_size
        db.default_queue_policy.default_timeout_microseconds = default_timeout_us
        db.default_queue_policy.allow_timeout_override = True
    group = config.instance_group.add()
    group.count = instance_count
    group.kind = mc.ModelInstanceGroup.Kind.Value(instance_kind)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config
