"""`resize_normalize`: the compiled kernel matches torch's bilinear interpolate + normalise.

The reference is torch (F.interpolate, align_corners=False, no antialias);
the kernel agrees within 1e-4 after normalisation, writes a caller's buffer in
place, gives the same result on any number of threads, and refuses the same
arguments with an error naming the argument (and the image's index).
"""

from __future__ import annotations

import numpy as np
import pytest

from native import _core, _reference
from test_native import assert_refused, readonly

IMPLS = [pytest.param(_core.resize_normalize, id="native"), pytest.param(_reference.resize_normalize, id="torch")]
MEAN3 = np.array([0.485, 0.456, 0.406], np.float32)
STD3 = np.array([0.229, 0.224, 0.225], np.float32)


def stats(c):
    if c == 3:
        return MEAN3, STD3
    rng = np.random.default_rng(c)
    return rng.uniform(0, 1, c).astype(np.float32), rng.uniform(0.1, 0.5, c).astype(np.float32)


def images(rng, sizes, c):
    shape = (lambda h, w: (h, w)) if c == 0 else (lambda h, w: (h, w, c))
    return [rng.integers(0, 256, shape(h, w), dtype=np.uint8) for h, w in sizes]


def assert_close(images_, out_h, out_w, c):
    mean, std = stats(max(c, 1))
    native = _core.resize_normalize(images_, out_h, out_w, mean, std)
    reference = _reference.resize_normalize(images_, out_h, out_w, mean, std)
    assert native.dtype == reference.dtype == np.float32
    assert native.shape == reference.shape == (len(images_), max(c, 1), out_h, out_w)
    np.testing.assert_allclose(native, reference, rtol=0, atol=1e-4)
    return native


@pytest.mark.parametrize("c", [0, 1, 3, 4])
@pytest.mark.parametrize("out_h, out_w", [(64, 64), (7, 13), (1, 1), (200, 150)])
def test_images_of_varying_sizes_match_torch(c, out_h, out_w):
    rng = np.random.default_rng(c * 1000 + out_h)
    sizes = [(96, 96), (1, 1), (1, 37), (41, 1), (64, 64), (33, 250), (300, 17)]
    assert_close(images(rng, sizes, c), out_h, out_w, c)


def test_an_empty_batch():
    out = assert_close([], 8, 8, 3)
    assert out.shape == (0, 3, 8, 8)


def test_constant_images_normalise_exactly():
    image = np.full((10, 20, 3), 255, np.uint8)
    out = _core.resize_normalize([image], 5, 5, MEAN3, STD3)
    np.testing.assert_allclose(out[0, :, 2, 2], (1.0 - MEAN3) / STD3, rtol=1e-6)


def test_threads_give_the_same_bits():
    rng = np.random.default_rng(9)
    batch = images(rng, [(96, 96)] * 9 + [(50, 70)] * 4, 3)
    one = _core.resize_normalize(batch, 64, 64, MEAN3, STD3)
    for threads in (2, 3, 16):
        np.testing.assert_array_equal(_core.resize_normalize(batch, 64, 64, MEAN3, STD3, threads=threads), one)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_buffer_is_written_in_place_and_returned(impl):
    rng = np.random.default_rng(4)
    batch = images(rng, [(30, 40), (12, 12), (5, 90)], 3)
    buffer = np.full((5, 3, 16, 16), -99.0, np.float32)
    out = buffer[1:4]  # a C-contiguous window of a larger batch buffer
    result = impl(batch, 16, 16, MEAN3, STD3, out=out, threads=2)
    assert result is out
    np.testing.assert_allclose(buffer[1:4], impl(batch, 16, 16, MEAN3, STD3), atol=1e-6)
    assert (buffer[0] == -99.0).all() and (buffer[4] == -99.0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_read_only_and_tuple_inputs_are_fine(impl):
    image = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    image.flags.writeable = False
    out = impl((image,), 8, 8, MEAN3, STD3)
    assert out.shape == (1, 3, 8, 8)


_IMG = np.zeros((8, 8, 3), np.uint8)


BAD_CALLS = {
    "images not a list": ((_IMG, 4, 4, MEAN3, STD3), {}, TypeError, "images"),
    "images None": ((None, 4, 4, MEAN3, STD3), {}, TypeError, "images"),
    "image not an array": (([_IMG, [[1, 2]]], 4, 4, MEAN3, STD3), {}, TypeError, "images[1]"),
    "image float32": (([_IMG.astype(np.float32)], 4, 4, MEAN3, STD3), {}, TypeError, "images[0]"),
    "image 1-d": (([np.zeros(8, np.uint8)], 4, 4, MEAN3, STD3), {}, TypeError, "images[0]"),
    "image 4-d": (([_IMG[None]], 4, 4, MEAN3, STD3), {}, TypeError, "images[0]"),
    "image strided": (([_IMG, np.zeros((8, 16, 3), np.uint8)[:, ::2]], 4, 4, MEAN3, STD3), {}, TypeError, "images[1]"),
    "image channels": (([_IMG, np.zeros((8, 8, 4), np.uint8)], 4, 4, MEAN3, STD3), {}, ValueError, "images[1]"),
    "image gray for 3": (([np.zeros((8, 8), np.uint8)], 4, 4, MEAN3, STD3), {}, ValueError, "images[0]"),
    "image empty": (([np.zeros((0, 8, 3), np.uint8)], 4, 4, MEAN3, STD3), {}, ValueError, "images[0]"),
    "out_h zero": (([_IMG], 0, 4, MEAN3, STD3), {}, ValueError, "out_h"),
    "out_w negative": (([_IMG], 4, -1, MEAN3, STD3), {}, ValueError, "out_w"),
    "out_h huge": (([_IMG], 2**40, 4, MEAN3, STD3), {}, ValueError, "out_h"),
    "out_h float": (([_IMG], 4.0, 4, MEAN3, STD3), {}, TypeError, "out_h"),
    "out_w bool": (([_IMG], 4, True, MEAN3, STD3), {}, TypeError, "out_w"),
    "mean float64": (([_IMG], 4, 4, MEAN3.astype(np.float64), STD3), {}, TypeError, "mean"),
    "mean empty": (([_IMG], 4, 4, np.zeros(0, np.float32), np.zeros(0, np.float32)), {}, ValueError, "mean"),
    "std length": (([_IMG], 4, 4, MEAN3, STD3[:2].copy()), {}, ValueError, "std"),
    "std zero": (([_IMG], 4, 4, MEAN3, np.array([1, 0, 1], np.float32)), {}, ValueError, "std"),
    "std nan": (([_IMG], 4, 4, MEAN3, np.array([1, np.nan, 1], np.float32)), {}, ValueError, "std"),
    "threads zero": (([_IMG], 4, 4, MEAN3, STD3), {"threads": 0}, ValueError, "threads"),
    "threads many": (([_IMG], 4, 4, MEAN3, STD3), {"threads": 257}, ValueError, "threads"),
    "threads float": (([_IMG], 4, 4, MEAN3, STD3), {"threads": 2.0}, TypeError, "threads"),
    "out float64": (([_IMG], 4, 4, MEAN3, STD3), {"out": np.zeros((1, 3, 4, 4))}, TypeError, "out"),
    "out shape": (([_IMG], 4, 4, MEAN3, STD3), {"out": np.zeros((1, 3, 4, 5), np.float32)}, ValueError, "out"),
    "out read-only": (([_IMG], 4, 4, MEAN3, STD3), {"out": readonly(np.zeros((1, 3, 4, 4), np.float32))}, TypeError,
                      "out"),
    "out strided": (([_IMG], 4, 4, MEAN3, STD3), {"out": np.zeros((1, 3, 4, 8), np.float32)[..., ::2]}, TypeError,
                    "out"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_an_error_naming_the_argument(impl, case):
    args, kw, error, name = BAD_CALLS[case]
    assert_refused(impl, args, kw, error, name, kw.get("out"))


@pytest.mark.parametrize("impl", IMPLS)
def test_threads_is_keyword_only(impl):
    with pytest.raises(TypeError):
        impl([_IMG], 4, 4, MEAN3, STD3, None, 2)
