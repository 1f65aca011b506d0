"""fleet's preprocessing kernels: compiled (`native._core`) or the NumPy reference.

`BACKEND` says which is live: "native" or "numpy". `FLEET_PURE_PYTHON=1` forces
the reference (the test suite runs both ways). The kernels and their contracts:

- `parse_v2_json(body)`: a KServe v2 JSON infer request as `orjson.loads` would
  read it, each input's "data" a NumPy array of its datatype and shape;
- `standardize(x, mean, std, clip, out=None)`: clipped z-scores and rows with NaN/Inf;
- `histogram(x, edges, counts)`: per-feature bin counts accumulated in place;
- `check_bounds(x, lo, hi, first, counts)`: the input contracts' range and finiteness rules:
  each row's first violating feature, per-feature counts of violations;
- `resize_normalize(images, out_h, out_w, mean, std, out=None, *, threads=1)`:
  bilinear resize and normalisation of uint8 images into a float32 batch.

Each docstring in `native._reference` is the contract of both implementations.

`otlp_spans(traces, offset_ns)`: OTLP protobuf of finished traces (serving/telemetry/otlp.py, whose Python
encoder is its reference), None when the kernels are the NumPy reference.

`H2` is the native gRPC transport (`native._h2`: HTTP/2 on libnghttp2, serving/grpc/native_server.py),
or None when it is not built or `FLEET_PURE_PYTHON=1` (gRPC is then served by grpc.aio).
"""

from __future__ import annotations

import logging
import os

from native import _reference

__all__ = ["BACKEND", "H2", "standardize", "histogram", "check_bounds", "resize_normalize", "parse_v2_json",
           "otlp_spans"]

_log = logging.getLogger("fleet.native")


def _load():
    if os.environ.get("FLEET_PURE_PYTHON", "") not in ("", "0"):
        return _reference, "numpy"
    try:
        from native import _core
    except ImportError as exc:  # a source checkout without the build
        _log.warning("native kernels unavailable (%s); using the NumPy reference", exc)
        return _reference, "numpy"
    return _core, "native"


def _load_h2():
    if os.environ.get("FLEET_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from native import _h2
    except ImportError as exc:  # built without libnghttp2, or a source checkout without the build
        _log.warning("native gRPC transport unavailable (%s); gRPC is served by grpc.aio", exc)
        return None
    return _h2


_impl, BACKEND = _load()
H2 = _load_h2()
_log.info("native kernels: %s", BACKEND)

standardize = _impl.standardize
histogram = _impl.histogram
check_bounds = _impl.check_bounds
resize_normalize = _impl.resize_normalize
parse_v2_json = _impl.parse_v2_json
# The OTLP span encoder (serving/telemetry/otlp.py's `_spans` in C++), None with the reference: its Python twin is there.
otlp_spans = getattr(_impl, "otlp_spans", None)
