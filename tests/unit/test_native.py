"""The `standardize` kernel: compiled (`native._core`) and NumPy reference (`native._reference`) agree.

Both are run on the same inputs and must give the same float32 bits, flag the
same rows, write a caller's buffer in place and refuse bad arguments with an
error that names the argument.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import native
from native import _core, _reference

IMPLS = [pytest.param(_core.standardize, id="native"), pytest.param(_reference.standardize, id="numpy")]


def both(*args, **kw):
    """Run both implementations; each gets its own copy of every array argument."""
    results = []
    for impl in (_core.standardize, _reference.standardize):
        copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        kw_copies = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        results.append(impl(*copies, **kw_copies))
    return results


def assert_same(a, b):
    (out_a, bad_a), (out_b, bad_b) = a, b
    assert out_a.dtype == out_b.dtype == np.float32
    assert bad_a.dtype == bad_b.dtype == np.bool_
    assert out_a.shape == out_b.shape and bad_a.shape == bad_b.shape
    np.testing.assert_array_equal(out_a, out_b)  # same bits, NaN where NaN
    np.testing.assert_array_equal(bad_a, bad_b)


def inputs(rng, n, d, *, scale=5.0):
    x = (rng.standard_normal((n, d)) * scale).astype(np.float32)
    mean = rng.standard_normal(d).astype(np.float32)
    std = rng.uniform(0.1, 3.0, d).astype(np.float32)
    return x, mean, std


# -- parity -----------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("n, d", [(0, 5), (1, 1), (1, 30), (7, 1), (64, 30), (1000, 17), (3, 0), (0, 0)])
@pytest.mark.parametrize("clip", [0.5, 3.0, 1e30])
def test_compiled_and_reference_agree_on_random_inputs(n, d, clip):
    rng = np.random.default_rng(n * 100 + d)
    x, mean, std = inputs(rng, n, d)
    native_result, numpy_result = both(x, mean, std, clip)
    assert_same(native_result, numpy_result)
    out, bad = native_result
    assert out.shape == (n, d) and bad.shape == (n,)
    assert not bad.any()
    # And both are right, not only equal.
    expected = np.clip((x.astype(np.float64) - mean) / std, -clip, clip)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(out).max(initial=0.0) <= np.float32(clip)


@pytest.mark.filterwarnings("error")
def test_rows_with_nan_or_inf_are_flagged_and_agree():
    x = np.array(
        [
            [1.0, 2.0, 3.0],
            [np.nan, 0.0, 0.0],
            [0.0, np.inf, 0.0],
            [0.0, 0.0, -np.inf],
            [4.0, -4.0, 0.5],
            [np.nan, np.inf, -np.inf],
        ],
        dtype=np.float32,
    )
    mean = np.array([1.0, 0.0, -1.0], dtype=np.float32)
    std = np.array([2.0, 0.5, 1.0], dtype=np.float32)
    native_result, numpy_result = both(x, mean, std, 3.0)
    assert_same(native_result, numpy_result)
    out, bad = native_result
    assert bad.tolist() == [False, True, True, True, False, True]
    assert np.isnan(out[1, 0]) and out[2, 1] == 3.0 and out[3, 2] == -3.0  # ±Inf clipped, NaN kept
    np.testing.assert_array_equal(out[4], [1.5, -3.0, 1.5])  # -8 clipped to -3


@pytest.mark.filterwarnings("error")  # overflow is expected and clipped: no RuntimeWarning either way
def test_extreme_values_agree():
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.array([[big, -big, tiny], [-big, big, -tiny], [0.0, 0.0, 0.0]], dtype=np.float32)
    mean = np.array([-big, big, 0.0], dtype=np.float32)  # x - mean overflows to ±Inf
    std = np.array([1e-38, 1e38, tiny], dtype=np.float32)
    for clip in (1.0, 1e38, 1e40, np.float32(2.5), np.float64(7), 5):
        native_result, numpy_result = both(x, mean, std, clip)
        assert_same(native_result, numpy_result)
        assert not native_result[1].any()  # finite x: not a bad row, whatever the arithmetic did
    out, _ = both(x, mean, std, 1e40)[0]
    assert out[0, 0] == np.inf  # clip 1e40 is +Inf in float32: nothing is clipped


# -- the out= buffer --------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffer_is_written_in_place_and_returned(impl):
    rng = np.random.default_rng(7)
    x, mean, std = inputs(rng, 32, 6)
    buffer = np.full((40, 6), -99.0, dtype=np.float32)
    out = buffer[4:36]  # a C-contiguous window of a larger batch buffer
    result, bad = impl(x, mean, std, 2.0, out=out)
    assert result is out
    fresh, fresh_bad = impl(x, mean, std, 2.0)
    np.testing.assert_array_equal(buffer[4:36], fresh)
    assert (buffer[:4] == -99.0).all() and (buffer[36:] == -99.0).all()  # nothing outside the window
    np.testing.assert_array_equal(bad, fresh_bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_standardize_in_place_still_flags_bad_rows(impl):
    x = np.array([[1.0, np.inf], [2.0, 3.0], [-np.inf, 0.0], [np.nan, 1.0]], dtype=np.float32)
    mean = np.zeros(2, dtype=np.float32)
    std = np.ones(2, dtype=np.float32)
    expected_out, expected_bad = impl(x.copy(), mean, std, 2.5)
    result, bad = impl(x, mean, std, 2.5, out=x)
    assert result is x
    np.testing.assert_array_equal(x, expected_out)
    assert bad.tolist() == expected_bad.tolist() == [True, False, True, True]


# -- bad arguments -----------------------------------------------------------------------

_X = np.ones((4, 3), dtype=np.float32)
_M = np.zeros(3, dtype=np.float32)
_S = np.ones(3, dtype=np.float32)


def readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


BAD_CALLS = {
    "x float64": ((_X.astype(np.float64), _M, _S, 3.0), {}, TypeError, "x"),
    "x int32": ((_X.astype(np.int32), _M, _S, 3.0), {}, TypeError, "x"),
    "x 1-d": ((_X[0], _M, _S, 3.0), {}, TypeError, "x"),
    "x 3-d": ((_X[None], _M, _S, 3.0), {}, TypeError, "x"),
    "x strided": ((np.ones((4, 6), np.float32)[:, ::2], _M, _S, 3.0), {}, TypeError, "x"),
    "x fortran": ((np.asfortranarray(np.ones((4, 3), np.float32)), _M, _S, 3.0), {}, TypeError, "x"),
    "x list": ((_X.tolist(), _M, _S, 3.0), {}, TypeError, "x"),
    "x None": ((None, _M, _S, 3.0), {}, TypeError, "x"),
    "mean float64": ((_X, _M.astype(np.float64), _S, 3.0), {}, TypeError, "mean"),
    "mean 2-d": ((_X, _M[None], _S, 3.0), {}, TypeError, "mean"),
    "mean length": ((_X, np.zeros(4, np.float32), _S, 3.0), {}, ValueError, "mean"),
    "std strided": ((_X, _M, np.ones(6, np.float32)[::2], 3.0), {}, TypeError, "std"),
    "std length": ((_X, _M, np.ones(2, np.float32), 3.0), {}, ValueError, "std"),
    "std zero": ((_X, _M, np.array([1, 0, 1], np.float32), 3.0), {}, ValueError, "std"),
    "std negative": ((_X, _M, np.array([1, -1, 1], np.float32), 3.0), {}, ValueError, "std"),
    "std nan": ((_X, _M, np.array([1, np.nan, 1], np.float32), 3.0), {}, ValueError, "std"),
    "clip zero": ((_X, _M, _S, 0.0), {}, ValueError, "clip"),
    "clip negative": ((_X, _M, _S, -1.0), {}, ValueError, "clip"),
    "clip nan": ((_X, _M, _S, float("nan")), {}, ValueError, "clip"),
    "clip below float32": ((_X, _M, _S, 1e-50), {}, ValueError, "clip"),
    "clip string": ((_X, _M, _S, "3"), {}, TypeError, "clip"),
    "clip None": ((_X, _M, _S, None), {}, TypeError, "clip"),
    "out float64": ((_X, _M, _S, 3.0), {"out": np.zeros((4, 3))}, TypeError, "out"),
    "out shape": ((_X, _M, _S, 3.0), {"out": np.zeros((3, 3), np.float32)}, ValueError, "out"),
    "out 1-d": ((_X, _M, _S, 3.0), {"out": np.zeros(12, np.float32)}, TypeError, "out"),
    "out strided": ((_X, _M, _S, 3.0), {"out": np.zeros((4, 6), np.float32)[:, ::2]}, TypeError, "out"),
    "out read-only": ((_X, _M, _S, 3.0), {"out": readonly(np.zeros((4, 3), np.float32))}, TypeError, "out"),
}


def assert_refused(impl, args, kw, error, name, written=None):
    """impl(*args, **kw) raises exactly `error`, its message naming `name`, and leaves `written` as it was."""
    before = written.copy() if isinstance(written, np.ndarray) else None
    with pytest.raises(error) as info:
        impl(*args, **kw)
    assert type(info.value) is error
    assert str(info.value).startswith(f"{name}:"), str(info.value)
    if before is not None:
        np.testing.assert_array_equal(written, before)  # a refused call writes nothing


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_an_error_naming_the_argument(impl, case):
    args, kw, error, name = BAD_CALLS[case]
    assert_refused(impl, args, kw, error, name, kw.get("out"))


def test_a_refused_strided_out_is_not_silently_replaced_by_a_copy():
    # An implicit conversion would write into a temporary and leave the caller's buffer as it was.
    backing = np.zeros((4, 6), np.float32)
    with pytest.raises(TypeError, match="^out:"):
        _core.standardize(_X, _M, _S, 3.0, out=backing[:, ::2])
    assert not backing.any()


# -- which implementation is live ------------------------------------------------------------


KERNELS = ("standardize", "histogram", "check_bounds", "resize_normalize", "parse_v2_json")


def _backend_in_subprocess(pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FLEET_PURE_PYTHON"}
    if pure is not None:
        env["FLEET_PURE_PYTHON"] = pure
    code = ("import native; print(native.BACKEND, *sorted({getattr(native, k).__module__.split('.')[1] for k in "
            f"{KERNELS!r}}}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_backend_is_native_unless_pure_python_is_forced():
    forced = os.environ.get("FLEET_PURE_PYTHON", "") not in ("", "0")
    assert native.BACKEND == ("numpy" if forced else "native")
    for name in KERNELS:
        assert getattr(native, name) is getattr(_reference if forced else _core, name)
    assert set(native.__all__) == {"BACKEND", "H2", "otlp_spans", *KERNELS}
    # the OTLP encoder: compiled, or None (serving/telemetry/otlp.py encodes in Python then)
    assert native.otlp_spans is (None if forced else _core.otlp_spans)
    # the native gRPC transport follows the same switch (serving/grpc/native_server.py; grpc.aio without it)
    if forced:
        assert native.H2 is None
    else:
        from native import _h2

        assert native.H2 is _h2
    assert _backend_in_subprocess(None) == "native _core"
    assert _backend_in_subprocess("0") == "native _core"
    assert _backend_in_subprocess("1") == "numpy _reference"
