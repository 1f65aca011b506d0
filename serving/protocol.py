"""KServe v2 / Open Inference Protocol codec: JSON tensors and the binary tensor extension.

Pure functions over bytes and NumPy arrays; no HTTP framework here. A binary
request is a JSON header of `Inference-Header-Content-Length` bytes followed by
the raw tensors of the inputs whose `parameters.binary_data_size` is set, in
input order. Responses put outputs asked for with `binary_data` after the JSON
the same way.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import orjson

import native
from serving.datatypes import V2_TO_NUMPY
from serving.errors import InvalidInput
from serving.limits import RequestLimits, check_json_depth, check_string, check_strings, over_limit, short_strings

__all__ = [
    "InputTensor",
    "RequestedOutput",
    "InferRequest",
    "check_shape",
    "check_input",
    "binary_tensor",
    "little_endian_bytes",
    "decode_request",
    "encode_response",
    "serialize_bytes_tensor",
    "deserialize_bytes_tensor",
]

_INT_KINDS = "iu"
_MAX_DIMS = 16
# Bound on the product of a shape's non-zero dims: NumPy cannot even describe an
# empty array whose other dims multiply past its index range.
_MAX_SHAPE_ELEMENTS = 1 << 48


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # already of `shape` and the datatype's dtype


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request-level default


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    binary_output: bool = False  # request parameter binary_data_output
    parameters: dict = field(default_factory=dict)

    @property
    def timeout_us(self) -> int | None:
        """Triton's per-request `parameters.timeout`, in microseconds."""
        value = self.parameters.get("timeout")
        return int(value) if value is not None else None


# -- decoding ----------------------------------------------------------------


def check_shape(raw, where: str) -> tuple[int, ...]:
    """A tensor's declared shape, checked before anything is allocated for it."""
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise InvalidInput(f"{where}: 'shape' must be a list of at most {_MAX_DIMS} non-negative integers")
    for d in raw:
        if type(d) is not int or d < 0:
            raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers, got {raw!r}")
    if math.prod(d for d in raw if d) > _MAX_SHAPE_ELEMENTS:
        raise InvalidInput(f"{where}: shape {raw!r} is too large (more than {_MAX_SHAPE_ELEMENTS} elements)")
    return tuple(raw)


def check_input(i: int, name, datatype, raw_shape, seen: set[str], limits: RequestLimits) -> tuple[str, tuple]:
    """The checks every front end makes of input `i`'s header, before its data is looked at: a name (new in
    `seen`, added), a known datatype, a shape within the limits. Returns ("input '<name>'", the shape)."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{i}] needs a 'name'")
    limit = limits.max_string_bytes
    if limit and len(name) * 4 > limit:  # (check_string's own first test, before its message is made)
        check_string(name, f"inputs[{i}] name", limit)
    where = f"input {name!r}"
    if name in seen:
        raise InvalidInput(f"{where} is given twice")
    seen.add(name)
    if isinstance(datatype, str) and limit and len(datatype) * 4 > limit:  # checked before a wrong one is quoted back
        check_string(datatype, f"{where} datatype", limit)
    if datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"{where}: unsupported datatype {datatype!r}; expected one of {sorted(V2_TO_NUMPY)}")
    shape = check_shape(raw_shape, where)
    count = math.prod(shape)
    if limits.max_tensor_elements and count > limits.max_tensor_elements:
        raise InvalidInput(over_limit(f"{where}: {count} elements (shape {list(shape)})",
                                      limits.max_tensor_elements, "max_tensor_elements", " elements"))
    return where, shape


def _parameters(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return raw


def _json_data(data, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Convert v2 JSON `data` (flat or nested) to an array of `shape`, type-checked."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a list")
    data = _flatten(data, where)  # nested lists in order, whatever their nesting (as Triton reads them)
    if datatype == "BYTES":
        flat = data
        if len(flat) != count:
            raise InvalidInput(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {len(flat)}")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                out[i] = item.encode("utf-8")
            else:
                raise InvalidInput(f"{where}: BYTES data must be strings, element {i} is {type(item).__name__}")
        return out.reshape(shape)
    target = V2_TO_NUMPY[datatype]
    if target.kind == "f" and count:  # every float tensor with data; the rest are BOOL and integers
        return _json_floats(data, target, datatype, shape, count, where)
    try:
        raw = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"{where}: 'data' is not a regular array of numbers ({exc})") from None
    if raw.size != count:
        raise InvalidInput(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {raw.size}")
    kind = raw.dtype.kind
    if count == 0:
        return np.empty(shape, dtype=target)
    if target.kind == "b":
        if kind != "b":
            raise InvalidInput(f"{where}: BOOL data must be true/false")
    else:
        # NumPy silently turns true/false among numbers into 1/0, so look at the JSON types.
        types = _leaf_types(data, where)
        if bool in types:
            raise InvalidInput(f"{where}: {datatype} data must be numbers, not true/false")
        if not types <= {int}:
            raise InvalidInput(f"{where}: {datatype} data must be integers")
        info = np.iinfo(target)
        if kind not in _INT_KINDS:
            # Integers that fit neither int64 nor uint64 together (0 and 2**64-1)
            # become float64 in np.asarray; convert exactly instead.
            try:
                raw = np.array(data, dtype=target)
            except OverflowError:
                raise InvalidInput(f"{where}: {datatype} data must lie in [{info.min}, {info.max}]") from None
        lo, hi = raw.min(), raw.max()
        if lo < info.min or hi > info.max:
            raise InvalidInput(f"{where}: {datatype} data must lie in [{info.min}, {info.max}]")
    return raw.astype(target, copy=False).reshape(shape)


def _json_floats(data: list, target: np.dtype, datatype: str, shape: tuple[int, ...], count: int,
                 where: str) -> np.ndarray:
    """FP16/32/64 data: straight to the target type (the hot path: one conversion, one check)."""
    types = _leaf_types(data, where)
    if bool in types:
        raise InvalidInput(f"{where}: {datatype} data must be numbers, not true/false")
    if not types <= {float, int}:
        raise InvalidInput(f"{where}: {datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):  # overflow is reported below as InvalidInput
            out = np.array(data, dtype=target)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"{where}: 'data' is not a regular array of numbers ({exc})") from None
    if out.size != count:
        raise InvalidInput(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {out.size}")
    if not np.isfinite(out).all():  # JSON has no inf/NaN: 1e39 as FP32 or 70000 as FP16 overflowed
        raise InvalidInput(f"{where}: a value is out of range for {datatype}")
    return out.reshape(shape)


def _leaf_types(data: list, where: str, depth: int = 0) -> set[type]:
    """The Python types of the non-list elements of nested `data`, at C speed per level."""
    types = set(map(type, data))
    if list in types:
        if depth >= _MAX_DIMS:
            raise InvalidInput(f"{where}: 'data' is nested more than {_MAX_DIMS} deep")
        types.discard(list)
        for x in data:
            if type(x) is list:
                types |= _leaf_types(x, where, depth + 1)
    return types


def _flatten(data: list, where: str, depth: int = 0) -> list:
    if depth > _MAX_DIMS:
        raise InvalidInput(f"{where}: 'data' is nested more than {_MAX_DIMS} deep")
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list = []
    for x in data:
        if isinstance(x, list):
            flat.extend(_flatten(x, where, depth + 1))
        else:
            flat.append(x)
    return flat


def deserialize_bytes_tensor(buf: memoryview | bytes, count: int, where: str, max_bytes: int = 0) -> np.ndarray:
    """Binary BYTES: each element is a 4-byte little-endian length then that many bytes (at most `max_bytes`)."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    if count > end // 4:  # check before allocating `count` slots for a made-up shape
        raise InvalidInput(
            f"{where}: binary BYTES data of {end} bytes cannot hold {count} elements (4-byte length each)"
        )
    out = np.empty(count, dtype=object)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(f"{where}: binary BYTES data ends inside element {i} of {count}")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"{where}: binary BYTES element {i} claims {n} bytes past the end of its data")
        if max_bytes and n > max_bytes:  # before the copy
            raise InvalidInput(over_limit(f"{where}: BYTES element {i} of {n} bytes", max_bytes, "max_string_bytes",
                                          " bytes"))
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != end:
        raise InvalidInput(f"{where}: binary BYTES data has {end - pos} bytes after its {count} elements")
    return out


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel(order="C"):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


_LITTLE_ENDIAN = {datatype: dtype.newbyteorder("<") for datatype, dtype in V2_TO_NUMPY.items()}
_NATIVE_IS_LITTLE = sys.byteorder == "little"


def little_endian_bytes(arr: np.ndarray) -> bytes:
    """A numeric array's values as little-endian bytes in row-major order (the binary extension's and gRPC's
    raw contents), whatever its byte order and layout."""
    if _NATIVE_IS_LITTLE and arr.dtype.isnative:  # tobytes copies in C order, whatever the layout
        return arr.tobytes()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def binary_tensor(blob: memoryview, datatype: str, shape: tuple[int, ...], where: str,
                  max_string_bytes: int = 0) -> np.ndarray:
    """One tensor's raw little-endian bytes (binary extension, gRPC raw contents) as an array of `shape`."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(blob, count, where, max_string_bytes).reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(blob) != expected:
        raise InvalidInput(
            f"{where}: binary_data_size is {len(blob)} bytes; shape {list(shape)} of {datatype} needs {expected}"
        )
    # Zero-copy view of the request body (read-only, as np.frombuffer's), little-endian as the protocol says.
    return np.ndarray(shape, _LITTLE_ENDIAN[datatype], blob)


def _check_bytes_elements(data: np.ndarray, where: str, limit: int) -> None:
    longest = max(map(len, data.ravel()), default=0) if limit else 0
    if longest > limit:
        raise InvalidInput(over_limit(f"{where}: a BYTES element of {longest} bytes", limit, "max_string_bytes",
                                      " bytes"))


_NO_LIMITS = RequestLimits(max_tensor_elements=0, max_string_bytes=0, max_json_depth=0, max_batch_rows=0)


def decode_request(body: bytes, header_length: int | None = None,
                   limits: RequestLimits = _NO_LIMITS) -> InferRequest:
    """Decode an infer request body; `header_length` is Inference-Header-Content-Length.

    Raises InvalidInput naming the input and what is wrong for any malformed body,
    and for one over `limits` (none unless given: the JSON's nesting depth before
    it is parsed, each input's element count from its declared shape before its
    data is checked and kept, the length of every string read).
    """
    if not body:
        raise InvalidInput("empty request body: expected a KServe v2 inference request (JSON)")
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        header, binary = body, memoryview(b"")
    check_json_depth(header, limits.max_json_depth)
    max_string = limits.max_string_bytes
    native_error = None
    try:
        # The native parser reads each input's JSON "data" straight into an array of its datatype.
        doc = native.parse_v2_json(header)
    except ValueError as exc:
        # A refused body (the rare path): read it again the plain way, so that the checks below
        # say which input is wrong and what it allows; the kernel's own message otherwise.
        native_error = str(exc)
        try:
            doc = orjson.loads(header)
        except orjson.JSONDecodeError as json_exc:
            raise InvalidInput(f"malformed JSON in the request: {json_exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request must be a JSON object with 'inputs'")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request needs 'inputs': a non-empty list of tensors")
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidInput("'id' must be a string")
        check_string(request_id, "'id'", max_string)
    parameters = _parameters(doc.get("parameters"), "request")
    if not short_strings(parameters, max_string):
        check_strings(parameters, "request parameter", max_string)
    timeout = parameters.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise InvalidInput("request parameter 'timeout' must be a non-negative integer (microseconds)")

    inputs: list[InputTensor] = []
    offset = 0
    seen: set[str] = set()
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name, datatype = raw.get("name"), raw.get("datatype")
        where, shape = check_input(i, name, datatype, raw.get("shape"), seen, limits)
        params = _parameters(raw.get("parameters"), where)
        if not short_strings(params, max_string):
            check_strings(params, f"{where} parameter", max_string)
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise InvalidInput(f"{where}: has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} binary bytes left)"
                )
            data = binary_tensor(binary[offset : offset + size], datatype, shape, where, max_string)
            offset += size
        elif "data" in raw:
            data = raw["data"]
            if native_error is not None:  # the plain read: lists, decoded and checked here
                data = _json_data(data, datatype, shape, where)
            if datatype == "BYTES" and isinstance(data, np.ndarray):
                _check_bytes_elements(data, where, max_string)
        else:
            raise InvalidInput(f"{where}: needs 'data' or parameters.binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, data))
    if native_error is not None:  # the plain checks found nothing more precise to say
        raise InvalidInput(f"invalid request: {native_error}")
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes after the JSON header but the inputs' binary_data_size add up to {offset}"
        )

    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs:  # absent or empty: every output of the model
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for j, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidInput(f"outputs[{j}] needs a 'name'")
            out_name = raw["name"]
            if max_string and len(out_name) * 4 > max_string:  # (check_string's own first test)
                check_string(out_name, f"outputs[{j}] name", max_string)
            params = raw.get("parameters")
            if type(params) is not dict:
                params = _parameters(params, f"output {out_name!r}")
            if not short_strings(params, max_string):
                check_strings(params, f"output {out_name!r} parameter", max_string)
            if params.get("classification"):
                raise InvalidInput(f"output {out_name!r}: the classification extension is not supported")
            binary_flag = params.get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise InvalidInput(f"output {out_name!r}: binary_data must be true or false")
            if outputs and any(o.name == out_name for o in outputs):
                raise InvalidInput(f"output {out_name!r} is requested twice")
            outputs.append(RequestedOutput(out_name, binary_flag))
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput("request parameter binary_data_output must be true or false")
    return InferRequest(inputs, request_id, outputs, binary_output, parameters)


# -- encoding ----------------------------------------------------------------


def _json_values(arr: np.ndarray) -> list:
    if arr.dtype == object or arr.dtype.kind in "SU":
        return [
            x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in arr.ravel(order="C")
        ]
    return arr.ravel(order="C").tolist()


def encode_response(
    model_name: str,
    model_version: str,
    outputs: list[tuple[str, str, np.ndarray, bool]],
    *,
    request_id: str | None = None,
    parameters: dict | None = None,
) -> tuple[bytes, int | None]:
    """Encode a v2 response from (name, datatype, array, binary) tuples.

    Returns (body, json_header_length); the length is None when no output is
    binary (a plain JSON body), else the value for Inference-Header-Content-Length.
    """
    described = []
    blobs: list[bytes] = []
    for name, datatype, arr, binary in outputs:
        entry: dict = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = serialize_bytes_tensor(arr) if datatype == "BYTES" else little_endian_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(arr)
        described.append(entry)
    doc: dict = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
