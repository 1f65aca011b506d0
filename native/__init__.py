"""fleet's preprocessing kernels: compiled (`native._core`) or the NumPy reference.

`BACKEND` says which is live: "native" or "numpy". `FLEET_PURE_PYTHON=1` forces
the NumPy reference (the test suite runs both ways).
"""

from __future__ import annotations

import logging
import os

from native import _reference

__all__ = ["BACKEND", "standardize"]

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


_impl, BACKEND = _load()
_log.info("native kernels: %s", BACKEND)

standardize = _impl.standardize
