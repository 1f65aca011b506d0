"""KServe v2 / Triton tensor datatypes and their NumPy and ModelConfig names."""

from __future__ import annotations

import numpy as np

__all__ = ["V2_TO_NUMPY", "numpy_dtype", "v2_datatype", "config_to_v2", "v2_to_config"]

# v2 datatype -> NumPy dtype. BYTES is an object array of `bytes`.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_V2 = {dt: name for name, dt in V2_TO_NUMPY.items()}
_NUMPY_TO_V2[np.dtype("S")] = "BYTES"


def numpy_dtype(datatype: str) -> np.dtype:
    """NumPy dtype of a v2 datatype name; KeyError when it has none."""
    return V2_TO_NUMPY[datatype]


def v2_datatype(dtype: np.dtype) -> str:
    """v2 datatype name of a NumPy dtype (bytes/str arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise TypeError(f"no v2 datatype for NumPy dtype {dtype}") from None


def config_to_v2(config_type: str) -> str:
    """ModelConfig DataType name ('TYPE_FP32') to v2 datatype ('FP32')."""
    name = config_type.removeprefix("TYPE_")
    if name == "STRING":
        return "BYTES"
    if name not in V2_TO_NUMPY:
        raise ValueError(f"unsupported tensor data type {config_type!r}")
    return name


def v2_to_config(datatype: str) -> str:
    """v2 datatype ('BYTES') to ModelConfig DataType name ('TYPE_STRING')."""
    if datatype == "BYTES":
        return "TYPE_STRING"
    if datatype not in V2_TO_NUMPY:
        raise ValueError(f"unsupported v2 datatype {datatype!r}")
    return "TYPE_" + datatype
