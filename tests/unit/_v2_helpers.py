"""Shared helpers for the v2 codec tests: awkward sample arrays, exact comparison, body builders."""


import json

import numpy as np
import tritonclient.http as httpclient

from serving.datatypes import V2_TO_NUMPY
from serving.protocol import InferRequest, decode_request

Client = httpclient.InferenceServerClient


_INTS = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
_FLOATS = ["FP16", "FP32", "FP64"]
_ALL = ["BOOL", *_INTS, *_FLOATS, "BYTES"]


def _sample(datatype: str, *, utf8_only: bool = False) -> np.ndarray:
    """A (2, 3) array of the datatype holding its awkward values: extremes, -0.0, subnormals, odd bytes."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BYTES":
        items = [b"", b"hello", "h\u00e9llo \u2603".encode(), b"a\x00b", b"x" * 300, b'quote" back\\slash']
        if not utf8_only:
            items[3] = b"\xff\xfe\x00\x80"  # not UTF-8: only the binary form can carry it
        return np.array(items, dtype=object).reshape(2, 3)
    dtype = V2_TO_NUMPY[datatype]
    if datatype in _INTS:
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    info = np.finfo(dtype)
    subnormal = info.smallest_subnormal
    return np.array([[info.min, info.max, -0.0], [info.tiny, subnormal, 0.1]], dtype=dtype)


def _same(got: np.ndarray, want: np.ndarray) -> None:
    """Exact equality: dtype, shape and every bit (so -0.0 and subnormals count)."""
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.ravel().tolist() == want.ravel().tolist()
    else:
        assert got.dtype == want.dtype
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


def _triton_input(name: str, datatype: str, arr: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


def _body(doc: dict, *tails: bytes) -> tuple[bytes, int | None]:
    header = json.dumps(doc).encode()
    return (header + b"".join(tails), len(header)) if tails else (header, None)


def _decode_doc(doc: dict, *tails: bytes) -> InferRequest:
    return decode_request(*_body(doc, *tails))


def _one(datatype: str, shape: list, data) -> dict:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}


