"""orjson + NumPy reference of `parse_v2_json`.

The document is `orjson.loads(body)`; then, if it is an object whose "inputs" is a
list, each object in that list with a "data" key gets "data" replaced by a NumPy
array of its "datatype" and "shape". The rules, shared with the compiled kernel:

- "data" must be a list; nested lists are flattened in order whatever their
  nesting (as Triton reads them) and must hold prod(shape) values;
- "shape" a list of at most 32 non-negative ints; "datatype" one of `DTYPES`;
- BOOL takes true/false only; integer types take integer tokens only (not 1.0,
  1e3 or true) within the type's range; FP16/FP32/FP64 take any JSON number (not
  true/false), read as the correctly rounded double and then rounded once to the
  type, refused if that overflows to ±inf; BYTES takes strings, encoded as UTF-8
  `bytes` in an object array (what serving/protocol.py makes of JSON BYTES).

Anything else is a ValueError: malformed JSON (what orjson refuses, including
NaN/Infinity and numbers that overflow a double), a missing or unknown datatype,
a bad shape, a count that does not match the shape, a value the datatype refuses.
The compiled kernel's messages start with "byte N: " (the offset into the body of
the element, the input object or the JSON error); the reference's tensor messages
are the same text without it.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

__all__ = ["parse_v2_json", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_TYPE_LIST = "BOOL, BYTES, FP16, FP32, FP64, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64"
_MAX_DIMS = 32
_MAX_ELEMENTS = 2**62


def parse_v2_json(body):
    """Parse a KServe v2 JSON infer request; each input's "data" becomes a NumPy array (see the module doc)."""
    if isinstance(body, memoryview):
        if not body.c_contiguous:
            raise TypeError("body: expected bytes, bytearray or a C-contiguous memoryview")
        body = body.tobytes()
    elif not isinstance(body, (bytes, bytearray)):
        raise TypeError("body: expected bytes, bytearray or a C-contiguous memoryview")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"byte {_byte_offset(body, exc.pos)}: {exc.msg}") from None
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
        for i, item in enumerate(doc["inputs"]):
            if isinstance(item, dict) and "data" in item:
                item["data"] = _tensor(item, f"inputs[{i}]")
    return doc


def _byte_offset(body: bytes | bytearray, pos: int) -> int:
    # orjson reports a character position; the kernel reports bytes.
    try:
        return len(bytes(body).decode("utf-8")[:pos].encode("utf-8"))
    except UnicodeDecodeError:
        return pos


def _tensor(item: dict, where: str) -> np.ndarray:
    data = item["data"]
    if not isinstance(data, list):
        raise ValueError(f"{where}.data: expected a list")
    if "datatype" not in item:
        raise ValueError(f"{where}: 'data' needs a 'datatype', one of {_TYPE_LIST}")
    datatype = item["datatype"]
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise ValueError(f"{where}: unknown 'datatype', expected one of {_TYPE_LIST}")
    shape = _shape(item.get("shape"), where)
    count = math.prod(shape)
    flat = _flatten(data)
    if len(flat) != count:
        raise ValueError(f"{where}.data: shape {list(shape)} needs {count} values, 'data' has {len(flat)}")
    dtype = DTYPES[datatype]
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for k, value in enumerate(flat):
            if type(value) is not str:
                raise ValueError(f"{where}.data[{k}]: expected a string for BYTES")
            out[k] = value.encode("utf-8")
        return out.reshape(shape)
    if datatype == "BOOL":
        for k, value in enumerate(flat):
            if type(value) is not bool:
                raise ValueError(f"{where}.data[{k}]: expected true or false for BOOL")
        return np.array(flat, dtype=dtype).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        for k, value in enumerate(flat):
            if type(value) is not int:
                raise ValueError(f"{where}.data[{k}]: expected an integer for {datatype}")
            if not info.min <= value <= info.max:
                raise ValueError(f"{where}.data[{k}]: expected an integer in [{info.min}, {info.max}] for {datatype}")
        return np.array(flat, dtype=dtype).reshape(shape)
    for k, value in enumerate(flat):
        if type(value) is not int and type(value) is not float:
            raise ValueError(f"{where}.data[{k}]: expected a number for {datatype}")
    # float(int) is the correctly rounded double, as the kernel reads an integer token.
    doubles = np.array([float(v) for v in flat], dtype=np.float64)
    with np.errstate(over="ignore"):
        out = doubles.astype(dtype)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(f"{where}.data[{bad[0]}]: expected a number that fits {datatype}")
    return out.reshape(shape)


def _shape(raw, where: str) -> tuple[int, ...]:
    what = f"{where}: 'shape' must be a list of at most {_MAX_DIMS} non-negative integers"
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise ValueError(what)
    product = 1
    for dim in raw:
        if type(dim) is not int or dim < 0:
            raise ValueError(what)
        if dim:
            product *= dim
            if product > _MAX_ELEMENTS:
                raise ValueError(f"{where}: 'shape' is too large")
    return tuple(raw)


def _flatten(data: list) -> list:
    if not any(type(x) is list for x in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is list:
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat
