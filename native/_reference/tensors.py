"""NumPy references of the tabular kernels: `standardize`, `histogram` and `check_bounds`."""

from __future__ import annotations

import numpy as np

from native._reference._checks import require_array

__all__ = ["standardize", "histogram", "check_bounds"]


def standardize(x, mean, std, clip, out=None):
    """clip((x - mean) / std, -clip, clip) over float32 x [n, d].

    Returns (out, bad_rows): bad_rows[i] is True where row i of x holds NaN or ±Inf.
    """
    x = require_array("x", x, np.float32, 2)
    mean = require_array("mean", mean, np.float32, 1)
    std = require_array("std", std, np.float32, 1)
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
        out = require_array("out", out, np.float32, 2, writable=True)
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


def histogram(x, edges, counts):
    """Add the per-feature bin counts of float32 x [n, d] into int64 counts [d, b + 2], in place.

    edges is float32 [d, b + 1], each row finite and strictly increasing. counts[j, 0]
    counts x < edges[j, 0] (underflow), counts[j, k] for k in 1..b the interval
    [edges[j, k-1], edges[j, k]) with the last one closed (NumPy's convention), and
    counts[j, b + 1] x > edges[j, b] (overflow). NaN is counted nowhere. Returns counts.
    """
    x = require_array("x", x, np.float32, 2)
    edges = require_array("edges", edges, np.float32, 2)
    counts = require_array("counts", counts, np.int64, 2, writable=True)
    n, d = x.shape
    if edges.shape[0] != d:
        raise ValueError("edges: must have one row per feature (x.shape[1] rows)")
    if edges.shape[1] < 2:
        raise ValueError("edges: each row needs at least 2 edges (1 bin)")
    if edges.shape[1] > 2**24:
        raise ValueError("edges: at most 2**24 edges per feature")
    bins = edges.shape[1] - 1
    if counts.shape != (d, bins + 2):
        raise ValueError("counts: shape must be (x.shape[1], edges.shape[1] + 1)")
    if not (np.isfinite(edges).all() and (np.diff(edges, axis=1) > 0).all()):
        raise ValueError("edges: every row must be finite and strictly increasing")
    for j in range(d):
        column = x[:, j]
        column = column[~np.isnan(column)]
        # Edges at or below each value: 0 is underflow, 1..b a bin, b + 1 overflow...
        index = np.searchsorted(edges[j], column, side="right")
        index[column == edges[j, bins]] = bins  # ...except the last edge itself, in the closed last bin
        counts[j] += np.bincount(index, minlength=bins + 2)
    return counts


def check_bounds(x, lo, hi, first, counts):
    """The input contracts' range and finiteness rules over float32 x [n, d] (in place, returns a count).

    first (int32 [n], written): the first feature j of row i that is NaN/±Inf or outside
    [lo[j], hi[j]], -1 when none. counts (int64 [2, d], added to): counts[0, j] the rows whose
    feature j is finite but out of range, counts[1, j] those where it is NaN or ±Inf. An infinite
    bound is no bound. Returns the number of violating rows.
    """
    x = require_array("x", x, np.float32, 2)
    lo = require_array("lo", lo, np.float32, 1)
    hi = require_array("hi", hi, np.float32, 1)
    first = require_array("first", first, np.int32, 1, writable=True)
    counts = require_array("counts", counts, np.int64, 2, writable=True)
    n, d = x.shape
    if lo.shape[0] != d:
        raise ValueError("lo: length must equal x.shape[1]")
    if hi.shape[0] != d:
        raise ValueError("hi: length must equal x.shape[1]")
    if first.shape[0] != n:
        raise ValueError("first: length must equal x.shape[0]")
    if counts.shape != (2, d):
        raise ValueError("counts: shape must be (2, x.shape[1])")
    if np.isnan(lo).any() or np.isnan(hi).any() or (lo > hi).any():
        raise ValueError("lo, hi: bounds must not be NaN and lo <= hi")
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        outside = finite & ((x < lo) | (x > hi))
    bad = outside | ~finite
    counts[0] += outside.sum(axis=0)
    counts[1] += (~finite).sum(axis=0)
    any_bad = bad.any(axis=1)
    first[:] = np.where(any_bad, bad.argmax(axis=1), -1) if d else -1
    return int(any_bad.sum())
