"""Per-batch preprocessing a model declares in its config.pbtxt, run with the `native` kernels.

The batcher hands a preprocessor the inputs of every request in a batch; it
returns the batch the model takes, and an error for each request whose data it
refuses (that request is answered 400, the others go on). Declared with
`parameters` entries:

- `preprocess: standardize` (one FP32 input [n, d]): `clip((x - mean) / std,
  -clip, clip)` with `mean` and `std` per feature from the version's
  metadata.json `reference_stats` (in `feature_names` order; a std <= 1e-6
  counts as 1) and `preprocess.clip` (default 10). A row holding NaN or ±Inf
  is refused. The same pass counts every feature into the bins of the
  reference histogram (`reference_stats[f]["edges"]`, plus underflow and
  overflow bins): the live-traffic statistics drift detection compares.
- `preprocess: image` (one UINT8 input, dims [-1, -1] or [-1, -1, c]): each
  image of any size is resized bilinearly to `preprocess.size` ("H,W"), then
  `(v / 255 - mean) / std` per channel (`preprocess.mean`, `preprocess.std`,
  comma-separated), into float32 [n, c, H, W]. Requests with images of
  different sizes batch together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import native
from serving.errors import FleetError, InvalidInput, RepositoryError
from serving.model_config import ModelSpec, TensorSpec
from serving.monitoring.contracts import Contract, RowFlags, parse_contract, refuse

__all__ = [
    "PREPROCESS_PARAM", "Preprocessor", "Standardize", "ImageResize", "make_preprocessor", "model_inputs",
    "FeatureReference",
]

PREPROCESS_PARAM = "preprocess"
KINDS = ("standardize", "image")
_STD_FLOOR = 1e-6
_MAX_SIDE = 4096  # pixels per image side a request may send (the kernels accept more; the service does not)

Arrays = Mapping[str, np.ndarray]


class Preprocessor:
    """What the batcher asks of a model's preprocessing (see the module doc)."""

    input_name: str
    heavy = False  # True: run it off the event loop (its kernels release the GIL)

    def check(self, arr: np.ndarray) -> None:
        """Refuse one request's input before it is queued (raises InvalidInput)."""

    def signature(self, arr: np.ndarray) -> tuple:
        """Requests with equal signatures may share a batch."""
        return (arr.dtype.str, arr.shape[1:])

    def assemble(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, list[FleetError | None]]:
        """The model's input for the batch of `parts` (one per request, batch rows first), and each part's error."""
        raise NotImplementedError


@dataclass(frozen=True)
class FeatureReference:
    """Names and reference bin edges of a model's features: what the live histograms are counted against."""

    names: tuple[str, ...]
    edges: np.ndarray  # float32 [d, bins + 1]

    def describe(self, counts: np.ndarray | None) -> list[dict]:
        bins = self.edges.shape[1] + 1
        if counts is None:
            counts = np.zeros((len(self.names), bins), np.int64)
        return [{"name": n, "edges": [float(e) for e in self.edges[j]], "counts": [int(c) for c in counts[j]]}
                for j, n in enumerate(self.names)]


class Standardize(Preprocessor):
    def __init__(self, input_name: str, mean: np.ndarray, std: np.ndarray, clip: float,
                 reference: FeatureReference | None = None, contract: Contract | None = None):
        self.input_name = input_name
        self.on_counts = None  # called with each batch's feature counts (int64 [d, bins + 2]) when set
        self.contract = contract  # input contract rules (serving/monitoring/contracts.py), None: none
        self.on_violations = None  # called with each batch's {(feature, rule): rows} when set
        self.mean = np.ascontiguousarray(mean, np.float32)
        self.std = np.ascontiguousarray(np.where(std > _STD_FLOOR, std, 1.0), np.float32)
        self.clip = float(clip)
        self.reference = reference

    def assemble(self, parts):
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        x = np.ascontiguousarray(x, np.float32)
        out, bad = native.standardize(x, self.mean, self.std, self.clip)
        if self.on_counts is not None and self.reference is not None:
            self.on_counts(self.histogram(x))
        errors: list = [None] * len(parts)
        if bad.any():
            offset = 0
            for i, part in enumerate(parts):
                rows = np.flatnonzero(bad[offset:offset + len(part)])
                if rows.size:
                    errors[i] = InvalidInput(f"input {self.input_name!r}: row {int(rows[0])} holds NaN or infinity; "
                                             "every feature must be a finite number")
                offset += len(part)
        if self.contract is not None:
            self._check_contract(x, parts, errors)
        return out, errors

    def _check_contract(self, x: np.ndarray, parts, errors: list) -> None:
        """Reject mode: a 400 for each request with a violating row; warn mode: its rows' flags (RowFlags)."""
        contract = self.contract
        first, rule, totals = contract.check(x)
        if totals and self.on_violations is not None:
            self.on_violations(totals)
        if not totals:
            return
        offset = 0
        for i, part in enumerate(parts):
            n = len(part)
            hit = np.flatnonzero(first[offset:offset + n] >= 0)
            if hit.size and errors[i] is None:
                r = int(hit[0])
                if contract.mode == "reject":
                    errors[i] = refuse(contract, x[offset + r], r, int(first[offset + r]), int(rule[offset + r]),
                                       self.input_name)
                else:
                    errors[i] = RowFlags(contract.flags(x[offset:offset + n]))
            offset += n

    def histogram(self, x: np.ndarray) -> np.ndarray | None:
        """Bin counts of the raw rows x against the reference edges, int64 [d, bins + 2]."""
        if self.reference is None:
            return None
        counts = np.zeros((self.reference.edges.shape[0], self.reference.edges.shape[1] + 1), np.int64)
        native.histogram(np.ascontiguousarray(x, np.float32), self.reference.edges, counts)
        return counts


class ImageResize(Preprocessor):
    heavy = True

    def __init__(self, input_name: str, height: int, width: int, mean: np.ndarray, std: np.ndarray):
        self.input_name = input_name
        self.height, self.width = height, width
        self.mean = np.ascontiguousarray(mean, np.float32)
        self.std = np.ascontiguousarray(std, np.float32)
        self.channels = self.mean.shape[0]

    def check(self, arr: np.ndarray) -> None:
        # validate_request has matched the dims to the config: [k, h, w] or [k, h, w, c]
        h, w = arr.shape[1], arr.shape[2]
        if not (1 <= h <= _MAX_SIDE and 1 <= w <= _MAX_SIDE):
            raise InvalidInput(f"input {self.input_name!r}: an image is {h} x {w} pixels; each side must lie in "
                               f"1..{_MAX_SIDE}")

    def signature(self, arr: np.ndarray) -> tuple:
        return ("image", arr.dtype.str)  # any size: resized per image when the batch is assembled

    def assemble(self, parts):
        images = [np.ascontiguousarray(img) for part in parts for img in part]
        out = native.resize_normalize(images, self.height, self.width, self.mean, self.std)
        return out, [None] * len(parts)


def model_inputs(spec: ModelSpec) -> tuple[TensorSpec, ...]:
    """The inputs the model itself takes: after `preprocess: image`, FP32 [c, H, W] in place of the images."""
    try:
        pre = make_preprocessor(spec, None) if spec.parameters.get(PREPROCESS_PARAM) == "image" else None
    except RepositoryError:
        pre = None  # the ingress reports the bad declaration; the worker keeps the config's view
    if not isinstance(pre, ImageResize):
        return spec.inputs
    return tuple(TensorSpec(t.name, "FP32", (pre.channels, pre.height, pre.width)) if t.name == pre.input_name else t
                 for t in spec.inputs)


def _floats(raw: str, name: str, source: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in raw.split(",")], np.float32)
    except ValueError:
        values = np.array([], np.float32)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise RepositoryError(f"{source}: parameter {name!r} must be comma-separated numbers, got {raw!r}")
    return values


def make_preprocessor(spec: ModelSpec, metadata: Mapping | None, source: str = "config.pbtxt") -> Preprocessor | None:
    """The preprocessor `spec`'s parameters declare (None if none); raises RepositoryError saying what is wrong."""
    kind = spec.parameters.get(PREPROCESS_PARAM)
    if kind is None:
        return None
    if kind not in KINDS:
        raise RepositoryError(f"{source}: parameter 'preprocess' must be one of {list(KINDS)}, got {kind!r}")
    if len(spec.inputs) != 1:
        raise RepositoryError(f"{source}: 'preprocess: {kind}' needs a model with exactly one input")
    tensor = spec.inputs[0]
    if kind == "standardize":
        if tensor.datatype != "FP32" or len(tensor.dims) != 1 or tensor.dims[0] < 1:
            raise RepositoryError(f"{source}: 'preprocess: standardize' needs one FP32 input [d]")
        return _standardize(spec, tensor.name, tensor.dims[0], metadata or {}, source)
    if tensor.datatype != "UINT8" or len(tensor.dims) not in (2, 3):
        raise RepositoryError(f"{source}: 'preprocess: image' needs one UINT8 input [h, w] or [h, w, c]")
    size = spec.parameters.get("preprocess.size", "")
    try:
        height, width = (int(v) for v in size.split(","))
    except ValueError:
        raise RepositoryError(f"{source}: parameter 'preprocess.size' must be 'H,W', got {size!r}") from None
    if not (1 <= height <= _MAX_SIDE and 1 <= width <= _MAX_SIDE):
        raise RepositoryError(f"{source}: 'preprocess.size' sides must lie in 1..{_MAX_SIDE}, got {size!r}")
    channels = tensor.dims[2] if len(tensor.dims) == 3 else 1  # -1 (any) is refused below
    mean = _floats(spec.parameters.get("preprocess.mean", "0"), "preprocess.mean", source)
    std = _floats(spec.parameters.get("preprocess.std", "1"), "preprocess.std", source)
    if channels < 1 or mean.size != channels or std.size != channels or not np.all(std > 0):
        raise RepositoryError(f"{source}: 'preprocess.mean' and 'preprocess.std' need {max(channels, 1)} value(s), "
                              "std > 0")
    return ImageResize(tensor.name, height, width, mean, std)


def _standardize(spec: ModelSpec, input_name: str, d: int, metadata: Mapping, source: str) -> Standardize:
    clip_raw = spec.parameters.get("preprocess.clip", "10")
    try:
        clip = float(clip_raw)
    except ValueError:
        clip = math.nan
    if not clip > 0 or math.isinf(clip):
        raise RepositoryError(f"{source}: parameter 'preprocess.clip' must be a positive number, got {clip_raw!r}")
    names = metadata.get("feature_names")
    stats = metadata.get("reference_stats")
    if not isinstance(names, list) or not isinstance(stats, dict) or len(names) != d:
        raise RepositoryError(f"{source}: 'preprocess: standardize' needs metadata.json 'feature_names' ({d} of them) "
                              "and 'reference_stats' with each feature's mean and std")
    try:
        mean = np.array([stats[n]["mean"] for n in names], np.float64)
        std = np.array([stats[n]["std"] for n in names], np.float64)
    except (KeyError, TypeError):
        raise RepositoryError(f"{source}: metadata.json 'reference_stats' lacks a feature's mean or std") from None
    reference = None
    try:
        edges = np.array([stats[n]["edges"] for n in names], np.float32)
        if edges.ndim == 2 and edges.shape[1] >= 2 and np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0):
            reference = FeatureReference(tuple(names), np.ascontiguousarray(edges))
    except (KeyError, TypeError, ValueError):
        reference = None  # no usable reference histogram: standardize without counting
    contract = parse_contract(spec.parameters, names, reference.edges if reference is not None else None, source)
    return Standardize(input_name, mean, std, clip, reference, contract)
