"""`check_bounds` (input contracts): compiled and NumPy reference flag the same rows and count the same violations."""

from __future__ import annotations

import numpy as np
import pytest

from native import _core, _reference
from test_native import assert_refused, readonly

IMPLS = [pytest.param(_core.check_bounds, id="native"), pytest.param(_reference.check_bounds, id="numpy")]


def both(x, lo, hi):
    """(violating rows, first, counts) from both implementations, checked equal."""
    results = []
    for impl in (_core.check_bounds, _reference.check_bounds):
        first = np.full(len(x), 99, np.int32)
        counts = np.ones((2, x.shape[1]), np.int64)  # added to, not overwritten
        bad = impl(x, lo, hi, first, counts)
        results.append((bad, first, counts - 1))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
    return results[0]


@pytest.mark.parametrize("n, d", [(0, 3), (1, 1), (7, 30), (1000, 30), (257, 5)])
def test_random_rows_agree_with_a_direct_computation(n, d):
    rng = np.random.default_rng(n * 31 + d)
    x = (rng.standard_normal((n, d)) * 2).astype(np.float32)
    if n:
        x[rng.integers(0, n, max(1, n // 50)), rng.integers(0, d, max(1, n // 50))] = np.nan
        x[rng.integers(0, n, max(1, n // 70)), rng.integers(0, d, max(1, n // 70))] = -np.inf
    lo = np.full(d, -3.0, np.float32)
    hi = np.full(d, 3.0, np.float32)
    hi[:: 2] = np.inf  # no upper bound on every other feature
    bad, first, counts = both(x, lo, hi)
    finite = np.isfinite(x)
    outside = finite & ((x < lo) | (x > hi))
    broken = outside | ~finite
    assert bad == int(broken.any(axis=1).sum())
    expected_first = np.where(broken.any(axis=1), broken.argmax(axis=1), -1)
    np.testing.assert_array_equal(first, expected_first)
    np.testing.assert_array_equal(counts[0], outside.sum(axis=0))
    np.testing.assert_array_equal(counts[1], (~finite).sum(axis=0))


def test_bounds_are_inclusive_and_infinite_bounds_accept_every_finite_value():
    x = np.array([[0.0, 1.0], [1.0, -1e38], [np.nextafter(np.float32(1), np.float32(2)), 0.0],
                  [np.inf, 0.0]], np.float32)
    lo = np.array([0.0, -np.inf], np.float32)
    hi = np.array([1.0, np.inf], np.float32)
    bad, first, counts = both(x, lo, hi)
    assert bad == 2
    assert first.tolist() == [-1, -1, 0, 0]
    assert counts.tolist() == [[1, 0], [1, 0]]  # just above 1: out of range; +inf: not finite


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["x float64", "lo length", "first length", "counts shape", "first readonly",
                                  "lo above hi", "nan bound"])
def test_bad_arguments_are_refused_alike_and_nothing_is_written(impl, case):
    x = np.zeros((4, 3), np.float32)
    lo, hi = np.zeros(3, np.float32), np.ones(3, np.float32)
    first, counts = np.zeros(4, np.int32), np.zeros((2, 3), np.int64)
    args = {
        "x float64": ((x.astype(np.float64), lo, hi, first, counts), TypeError, "x"),
        "lo length": ((x, lo[:2], hi, first, counts), ValueError, "lo"),
        "first length": ((x, lo, hi, first[:3], counts), ValueError, "first"),
        "counts shape": ((x, lo, hi, first, counts[:1]), ValueError, "counts"),
        "first readonly": ((x, lo, hi, readonly(first), counts), TypeError, "first"),
        "lo above hi": ((x, hi + 1, hi, first, counts), ValueError, "lo, hi"),
        "nan bound": ((x, np.full(3, np.nan, np.float32), hi, first, counts), ValueError, "lo, hi"),
    }[case]
    assert_refused(impl, args[0], {}, args[1], args[2], written=counts)
