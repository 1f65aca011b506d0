"""`histogram`: compiled and NumPy reference count the same, in place, and refuse the same arguments."""

from __future__ import annotations

import numpy as np
import pytest

from native import _core, _reference
from test_native import assert_refused, readonly

IMPLS = [pytest.param(_core.histogram, id="native"), pytest.param(_reference.histogram, id="numpy")]


def both(x, edges, counts=None):
    """Counts from both implementations, each into its own copy of `counts` (zeros if None)."""
    d, b1 = edges.shape
    start = np.zeros((d, b1 + 1), np.int64) if counts is None else counts
    results = []
    for impl in (_core.histogram, _reference.histogram):
        out = start.copy()
        assert impl(x, edges, out) is out
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    return results[0]


def sorted_edges(rng, d, bins, kind="normal"):
    if kind == "uniform":
        return np.tile(np.linspace(-3, 3, bins + 1, dtype=np.float32), (d, 1))
    edges = np.sort(rng.standard_normal((d, bins + 1)).astype(np.float32), axis=1)
    edges += np.arange(bins + 1, dtype=np.float32) * 1e-3  # strictly increasing
    return edges


@pytest.mark.parametrize("n, d, bins", [(0, 3, 4), (1, 1, 1), (1, 30, 20), (7, 1, 5), (1024, 30, 20), (333, 5, 200)])
@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_random_inputs_agree_and_match_numpy_histogram(n, d, bins, kind):
    rng = np.random.default_rng(n + d + bins)
    x = (rng.standard_normal((n, d)) * 1.5).astype(np.float32)
    edges = sorted_edges(rng, d, bins, kind)
    counts = both(x, edges)
    for j in range(d):
        inner, _ = np.histogram(x[:, j], bins=edges[j])
        np.testing.assert_array_equal(counts[j, 1:-1], inner)
        assert counts[j, 0] == (x[:, j] < edges[j, 0]).sum()
        assert counts[j, -1] == (x[:, j] > edges[j, -1]).sum()
    assert counts.sum() == n * d


def test_values_on_the_edges_nan_and_inf():
    edges = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    x = np.array([0.0, 1.0, 2.0, 3.0, -0.0, np.nextafter(np.float32(3), np.float32(4)), np.nextafter(np.float32(0), np.float32(-1)),
                  np.nan, np.inf, -np.inf, 2.9999998, 0.99999994], np.float32)[:, None]
    counts = both(x, edges)
    # under: just below 0, -inf; bins [0,1) [1,2) [2,3]; over: just above 3, +inf; NaN nowhere
    assert counts.tolist() == [[2, 3, 1, 3, 2]]


def test_extreme_values_and_a_huge_range():
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    edges = np.array([[-big, -1.0, -tiny, 0.0, tiny, 1.0, big]], np.float32)
    x = np.array([-big, big, -tiny, tiny, 0.0, -0.0, 1e-40, -1e-40, 0.5, -0.5, 3e38, -3e38, np.inf, -np.inf],
                 np.float32)[:, None]
    counts = both(x, edges)
    assert counts.sum() == len(x)


def test_edges_with_tiny_gaps_take_the_exact_path():
    # One bin far narrower than the rest: the lookup table is capped and cells hold several edges.
    rng = np.random.default_rng(2)
    edges = np.concatenate([np.linspace(-1, 1, 50, dtype=np.float32),
                            np.float32(1) + np.arange(1, 60, dtype=np.float32) * np.float32(1e-6)])[None]
    x = np.concatenate([rng.uniform(-1.5, 1.5, 2000), 1 + rng.uniform(0, 7e-5, 2000)]).astype(np.float32)[:, None]
    x = np.concatenate([x, edges.T])  # and every edge itself
    counts = both(x, edges)
    inner, _ = np.histogram(x[:, 0], bins=edges[0])
    np.testing.assert_array_equal(counts[0, 1:-1], inner)


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_accumulate_in_place(impl):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 4)).astype(np.float32)
    edges = sorted_edges(rng, 4, 10)
    counts = np.full((4, 12), 5, np.int64)
    assert impl(x, edges, counts) is counts
    assert impl(x, edges, counts) is counts
    once = impl(x, edges, np.zeros((4, 12), np.int64))
    np.testing.assert_array_equal(counts, 5 + 2 * once)


_X = np.zeros((4, 2), np.float32)
_E = np.array([[0, 1, 2], [0, 1, 2]], np.float32)
_C = np.zeros((2, 4), np.int64)


BAD_CALLS = {
    "x float64": ((_X.astype(np.float64), _E, _C), TypeError, "x"),
    "x 1-d": ((_X[:, 0], _E, _C), TypeError, "x"),
    "x strided": ((np.zeros((4, 4), np.float32)[:, ::2], _E, _C), TypeError, "x"),
    "x list": ((_X.tolist(), _E, _C), TypeError, "x"),
    "x None": ((None, _E, _C), TypeError, "x"),
    "edges float64": ((_X, _E.astype(np.float64), _C), TypeError, "edges"),
    "edges 1-d": ((_X, _E[0], _C), TypeError, "edges"),
    "edges rows": ((_X, _E[:1], _C), ValueError, "edges"),
    "edges one edge": ((_X, _E[:, :1].copy(), np.zeros((2, 2), np.int64)), ValueError, "edges"),
    "edges decreasing": ((_X, _E[:, ::-1].copy(), _C), ValueError, "edges"),
    "edges equal": ((_X, np.array([[0, 1, 1], [0, 1, 2]], np.float32), _C), ValueError, "edges"),
    "edges nan": ((_X, np.array([[0, np.nan, 2], [0, 1, 2]], np.float32), _C), ValueError, "edges"),
    "edges inf": ((_X, np.array([[-np.inf, 1, 2], [0, 1, 2]], np.float32), _C), ValueError, "edges"),
    "counts int32": ((_X, _E, _C.astype(np.int32)), TypeError, "counts"),
    "counts shape": ((_X, _E, np.zeros((2, 3), np.int64)), ValueError, "counts"),
    "counts read-only": ((_X, _E, readonly(_C)), TypeError, "counts"),
    "counts strided": ((_X, _E, np.zeros((2, 8), np.int64)[:, ::2]), TypeError, "counts"),
    "counts None": ((_X, _E, None), TypeError, "counts"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_an_error_naming_the_argument(impl, case):
    args, error, name = BAD_CALLS[case]
    assert_refused(impl, args, {}, error, name, args[2])  # a refused call counts nothing


def test_small_batches_and_large_ones_count_alike_on_every_kind_of_value():
    # Below 64 rows the kernel searches the edges; from 64 rows on it builds lookup tables.
    big = np.finfo(np.float32).max
    edges = np.array([[-big, -1.0, 0.0, 1.0, 2.0, 3.0, big]], np.float32)
    values = np.array([-big, big, 0.0, -0.0, 1.0, 2.0, 3.0, np.nextafter(np.float32(3), np.float32(4)),
                       np.nan, np.inf, -np.inf, 2.9999998, 0.99999994, -1.0, 1e-40], np.float32)
    x = np.tile(values, 10)[:, None]  # 150 rows
    whole = both(x, edges)
    pieces = np.zeros_like(whole)
    for start in range(0, len(x), 15):
        pieces = both(x[start:start + 15], edges, pieces)
    np.testing.assert_array_equal(whole, pieces)
    assert whole.sum() == 140  # every value but the 10 NaNs
