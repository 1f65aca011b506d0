"""NumPy reference implementations of the native kernels, same signatures."""

from __future__ import annotations

import numpy as np

__all__ = ["standardize"]


def _require_f32(name: str, a: object, ndim: int) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
        raise TypeError(f"{name}: expected a float32 NumPy array with {ndim} dimension(s)")
    if not a.flags.c_contiguous:
        raise TypeError(f"{name}: must be C-contiguous")
    return a


def standardize(x, mean, std, clip, out=None):
    """clip((x - mean) / std, -clip, clip) over float32 x [n, d].

    Returns (out, bad_rows): bad_rows[i] is True where row i of x holds NaN or ±Inf.
    """
    x = _require_f32("x", x, 2)
    mean = _require_f32("mean", mean, 1)
    std = _require_f32("std", std, 1)
    n, d = x.shape
    if mean.shape[0] != d:
        raise ValueError("mean: length must equal x.shape[1]")
    if std.shape[0] != d:
        raise ValueError("std: length must equal x.shape[1]")
    clip = _clip_f32(clip)
    if not clip > 0.0:
        raise ValueError("clip: must be > 0")
    if not np.all(std > 0):
        raise ValueError("std: every entry must be > 0")
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    else:
        out = _require_f32("out", out, 2)
        if not out.flags.writeable:
            raise TypeError("out: must be writable")
        if out.shape != (n, d):
            raise ValueError("out: shape must equal x.shape")
    # Before writing `out`: it may be `x` itself (standardize in place).
    bad = ~np.isfinite(x).all(axis=1) if d else np.zeros(n, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):  # as the kernel: overflow is clipped, NaN kept
        np.subtract(x, mean, out=out)
        np.divide(out, std, out=out)
        np.clip(out, -clip, clip, out=out)
    return out, bad


def _clip_f32(clip) -> np.float32:
    # As the compiled kernel: any real number, rounded to float32 (1e-50 is 0, 1e40 is inf).
    if isinstance(clip, (str, bytes, bool, np.bool_)):
        raise TypeError("clip: expected a real number")
    try:
        value = float(clip)
    except (TypeError, ValueError):
        raise TypeError("clip: expected a real number") from None
    with np.errstate(over="ignore"):
        return np.float32(value)
