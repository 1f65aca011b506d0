"""Reference implementations of the native kernels, with the same signatures.

NumPy (and torch for `resize_normalize`, orjson for `parse_v2_json`); the face
`native` falls back to these when the compiled `native._core` is missing or
FLEET_PURE_PYTHON=1, and the tests compare the two.
"""

from __future__ import annotations

from native._reference.images import resize_normalize
from native._reference.tensors import check_bounds, histogram, standardize
from native._reference.v2json import parse_v2_json

__all__ = ["standardize", "histogram", "check_bounds", "resize_normalize", "parse_v2_json"]
