"""Argument checks shared by the reference kernels, with the compiled kernels' messages."""

from __future__ import annotations

import numpy as np


def require_array(name: str, a: object, dtype: type, ndim: int, *, writable: bool = False) -> np.ndarray:
    """`a` itself if it is a C-contiguous NumPy array of `dtype` and `ndim`, else TypeError naming it."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} NumPy array with {ndim} dimension(s)")
    if not a.flags.c_contiguous:
        raise TypeError(f"{name}: must be C-contiguous")
    if writable and not a.flags.writeable:
        raise TypeError(f"{name}: must be writable")
    return a


def require_int(name: str, value: object, lo: int, hi: int) -> int:
    """A Python int (not a bool) in [lo, hi], else TypeError/ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: must be in [{lo}, {hi}]")
    return value
