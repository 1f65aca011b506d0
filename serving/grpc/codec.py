"""`ModelInferRequest` in, `InferRequest` out; the answer back as a serialized `ModelInferResponse`.

Tensors arrive either as `raw_input_contents` (one little-endian blob per input, in input
order: what `tritonclient.grpc` sends) or as typed `contents` (`fp32_contents`, ...). Both
become the same `InputTensor`s the HTTP decoder makes, checked with the same rules and limits
(shape, element count, datatype, string length), so validation and everything after it is
shared. Answers always go out as `raw_output_contents` (the client reads only those).
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from serving.datatypes import V2_TO_NUMPY
from serving.errors import InvalidInput
from serving.limits import RequestLimits, check_string, over_limit
from serving.protocol import InferRequest, InputTensor, RequestedOutput, binary_tensor, check_input, \
    little_endian_bytes, serialize_bytes_tensor

__all__ = ["parse_infer_request", "decode_infer_request", "encode_infer_response", "response_message",
           "stream_message", "parameters_from_proto", "FINAL_RESPONSE"]

FINAL_RESPONSE = "triton_final_response"

# The typed field of `InferTensorContents` that carries each datatype (FP16 and BF16 have none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def parse_infer_request(data: bytes) -> pb.ModelInferRequest:
    """The wire bytes as a message; malformed protobuf is the client's error (INVALID_ARGUMENT), not ours."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"malformed ModelInferRequest protobuf: {exc}") from None


def parameters_from_proto(params, where: str, max_string: int = 0) -> dict:
    """A `map<string, InferParameter>` as plain values (bool, int, str or float)."""
    if not params:  # the usual case, without walking an empty map
        return {}
    out = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"{where} parameter {key!r} has no value")
        item = getattr(value, kind)
        if isinstance(item, str):
            check_string(item, f"{where} parameter {key!r}", max_string)
        out[key] = item
    return out


def _contents_data(tensor, datatype: str, shape: tuple[int, ...], where: str, max_string: int) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"{where}: {datatype} data must be sent in raw_input_contents (it has no typed contents)")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"{where}: shape {list(shape)} needs {count} elements, {field} has {len(values)}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for i, item in enumerate(values):
            if max_string and len(item) > max_string:
                raise InvalidInput(over_limit(f"{where}: BYTES element {i} of {len(item)} bytes", max_string,
                                              "max_string_bytes", " bytes"))
            out[i] = item
        return out.reshape(shape)
    target = V2_TO_NUMPY[datatype]
    if target.kind in "iu" and count:
        raw = np.asarray(values, dtype=np.uint64 if field == "uint64_contents" else np.int64)
        info = np.iinfo(target)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(f"{where}: {datatype} data must lie in [{info.min}, {info.max}]")
        return raw.astype(target).reshape(shape)
    # NaN and infinities pass as they do in raw contents (protobuf carries them; JSON cannot): a model
    # that refuses them says so with a `finite` input contract.
    return np.asarray(values, dtype=target).reshape(shape)


def decode_infer_request(msg: pb.ModelInferRequest, limits: RequestLimits,
                         deadline_us: int | None = None) -> InferRequest:
    """The message as an `InferRequest`; InvalidInput naming the input and what is wrong otherwise.

    `deadline_us`: the time left before the call's gRPC deadline; it becomes the request's
    timeout (the shorter of it and a `timeout` parameter), so the batcher drops a request whose
    caller has stopped waiting.
    """
    max_string = limits.max_string_bytes
    tensors = msg.inputs
    if not tensors:
        raise InvalidInput("the request needs 'inputs': a non-empty list of tensors")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs: "
                           "send every input raw or none")
    if msg.id:
        check_string(msg.id, "'id'", max_string)
    parameters = parameters_from_proto(msg.parameters, "request", max_string)
    timeout = parameters.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise InvalidInput("request parameter 'timeout' must be a non-negative integer (microseconds)")
    if deadline_us is not None:
        parameters["timeout"] = max(1, min(deadline_us, timeout or deadline_us))
    inputs, seen = [], set()
    for i, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        where, shape = check_input(i, name, datatype, tensor.shape[:], seen, limits)  # (a list)
        parameters_from_proto(tensor.parameters, where, max_string)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where}: has both contents and raw_input_contents")
            data = binary_tensor(memoryview(raw[i]), datatype, shape, where, max_string)
        elif tensor.HasField("contents"):
            data = _contents_data(tensor, datatype, shape, where, max_string)
        else:
            raise InvalidInput(f"{where}: needs contents or raw_input_contents")
        inputs.append(InputTensor(name, datatype, shape, data))
    outputs = None
    if msg.outputs:
        outputs = []
        for j, out in enumerate(msg.outputs):
            name = out.name
            if not name:
                raise InvalidInput(f"outputs[{j}] needs a 'name'")
            if max_string and len(name) * 4 > max_string:  # (check_string's own first test)
                check_string(name, f"outputs[{j}] name", max_string)
            params = parameters_from_proto(out.parameters, f"output {name!r}", max_string) if out.parameters else {}
            if params.get("classification"):
                raise InvalidInput(f"output {name!r}: the classification extension is not supported")
            if outputs and any(o.name == name for o in outputs):
                raise InvalidInput(f"output {name!r} is requested twice")
            outputs.append(RequestedOutput(name, True))
    return InferRequest(inputs, msg.id or None, outputs, True, parameters)


def _varint(n: int) -> bytes:
    """A protobuf varint of a non-negative integer."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([n]) for n in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte, the payload's length and the payload."""
    return tag + _varint(len(payload)) + payload


def _output_field(name: str, datatype: str, shape: tuple) -> bytes:
    """`outputs` entry (field 5) of a ModelInferResponse: InferOutputTensor{name, datatype, shape}."""
    key = (name, datatype, shape)
    field = _OUTPUTS.get(key)
    if field is None:
        body = b"".join((_field(b"\x0a", name.encode()) if name else b"",
                         _field(b"\x12", datatype.encode()) if datatype else b"",
                         _field(b"\x1a", b"".join(map(_varint, shape))) if shape else b""))
        field = _field(b"\x2a", body)
        if len(_OUTPUTS) >= _MAX_CACHED_OUTPUTS:  # shapes that vary by batch: bounded, refilled from scratch
            _OUTPUTS.clear()
        _OUTPUTS[key] = field
    return field


_OUTPUTS: dict[tuple, bytes] = {}  # (name, datatype, shape) -> its encoded `outputs` field
_MAX_CACHED_OUTPUTS = 4096


def encode_infer_response(model: str, version: str, outputs: list, request_id: str | None) -> bytes:
    """(name, datatype, array, binary) tuples as a serialized ModelInferResponse with every tensor in
    `raw_output_contents`: the bytes `pb.ModelInferResponse(...).SerializeToString()` makes (field order,
    empty strings left out), written directly; an output's descriptor (name, datatype, shape) is encoded
    once per shape. `response_message` parses it back where a message is needed (a stream's final response)."""
    parts = [_field(b"\x0a", model.encode()) if model else b"",
             _field(b"\x12", version.encode()) if version else b"",
             _field(b"\x1a", request_id.encode()) if request_id else b""]
    raws = []
    for name, datatype, arr, _ in outputs:
        parts.append(_output_field(name, datatype, arr.shape))
        raws.append(_field(b"\x32", serialize_bytes_tensor(arr) if datatype == "BYTES" else little_endian_bytes(arr)))
    return b"".join(parts + raws)


def response_message(data: bytes) -> pb.ModelInferResponse:
    """An `encode_infer_response` answer as a message."""
    return pb.ModelInferResponse.FromString(data)


def stream_message(data: bytes) -> bytes:
    """A serialized ModelStreamInferResponse carrying an `encode_infer_response` answer (`infer_response`, field 2)."""
    return _field(b"\x12", data)
