"""Torch reference of `resize_normalize`: F.interpolate (bilinear) then normalise, image by image."""

from __future__ import annotations

import numpy as np

from native._reference._checks import require_array, require_int

__all__ = ["resize_normalize"]

_MAX_SIDE = 1 << 16
_MAX_THREADS = 256


def resize_normalize(images, out_h, out_w, mean, std, out=None, *, threads=1):
    """Resize uint8 images [h, w] or [h, w, c] to out_h x out_w and normalise to float32 [n, c, out_h, out_w].

    Bilinear with align_corners=False and no antialias (torch.nn.functional.interpolate),
    then (v / 255 - mean) / std per channel; mean and std are float32 of length c and
    every image must have c channels (an [h, w] image has 1). `threads` is checked and
    otherwise ignored here: the reference runs on torch's own thread setting.
    """
    if not isinstance(images, (list, tuple)):
        raise TypeError("images: expected a list of uint8 NumPy arrays")
    out_h = require_int("out_h", out_h, 1, _MAX_SIDE)
    out_w = require_int("out_w", out_w, 1, _MAX_SIDE)
    mean = require_array("mean", mean, np.float32, 1)
    std = require_array("std", std, np.float32, 1)
    require_int("threads", threads, 1, _MAX_THREADS)
    if mean.shape[0] == 0:
        raise ValueError("mean: needs one entry per channel, got none")
    if std.shape[0] != mean.shape[0]:
        raise ValueError("std: length must equal len(mean)")
    if not np.all(std > 0):
        raise ValueError("std: every entry must be > 0")
    c = mean.shape[0]
    for i, image in enumerate(images):
        at = f"images[{i}]: "
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3)
                and image.flags.c_contiguous):
            raise TypeError(at + "expected a C-contiguous uint8 NumPy array with 2 or 3 dimensions")
        if max(image.shape[:2]) > _MAX_SIDE * 16 or (image.ndim == 3 and image.shape[2] > _MAX_SIDE):
            raise ValueError(at + "is too large")
        channels = image.shape[2] if image.ndim == 3 else 1
        if channels != c:
            raise ValueError(at + f"has {channels} channel(s), mean and std have {c}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(at + "is empty")
    shape = (len(images), c, out_h, out_w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        out = require_array("out", out, np.float32, 4, writable=True)
        if out.shape != shape:
            raise ValueError("out: shape must be (len(images), len(mean), out_h, out_w)")
    import torch  # here: importing `native` must not pull in torch
    import torch.nn.functional as F

    m = torch.from_numpy(mean.copy()).view(c, 1, 1)
    s = torch.from_numpy(std.copy()).view(c, 1, 1)
    target = torch.from_numpy(out)
    for i, image in enumerate(images):
        pixels = torch.from_numpy(image if image.flags.writeable else image.copy())
        chw = pixels[None] if image.ndim == 2 else pixels.permute(2, 0, 1)
        resized = F.interpolate(chw[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False,
                                antialias=False)[0]
        target[i] = (resized / 255.0 - m) / s
    return out
