"""KServe v2 codec: malformed requests are InvalidInput saying what is wrong, and a fuzz.

No body whatsoever may escape as anything but InvalidInput (the ingress turns
that into a 400; anything else is a 500).
"""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, note, settings, strategies as st

from serving.datatypes import V2_TO_NUMPY
from serving.errors import InvalidInput
from serving.protocol import InferRequest, decode_request

from _v2_helpers import Client, _ALL, _body, _decode_doc, _one, _triton_input

# -- malformed requests: InvalidInput saying what is wrong ---------------------

_F32x2 = np.array([1, 2], dtype=np.float32).tobytes()


def _bin(datatype: str, shape: list, size, **extra) -> dict:
    """An input named x whose data is `size` bytes of the binary tail."""
    return {"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}, **extra}


def _blen(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _x(**fields) -> dict:
    """A request whose one input x is FP32 [1] = [1.0], with `fields` replacing or added to the input."""
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0], **fields}]}


def _raw(body: bytes, phrase: str, *, header_length: int | None = None, id: str):
    return pytest.param(body, header_length, phrase, id=id)


def _doc(doc: dict, phrase: str, *tails: bytes, id: str):
    return pytest.param(*_body(doc, *tails), phrase, id=id)


def _data(datatype: str, shape: list, data, phrase: str, *, id: str):
    return _doc(_one(datatype, shape, data), phrase, id=id)


def _req(top: dict, phrase: str, *, id: str):
    """_x() with request-level fields."""
    return _doc(_x() | top, phrase, id=id)


def _out(params, phrase: str, *, id: str):
    """_x() asking for output y with these output parameters."""
    return _doc(_x() | {"outputs": [{"name": "y", "parameters": params}]}, phrase, id=id)


_NO_NAME = {"datatype": "FP32", "shape": [1], "data": [1]}

_MALFORMED = [
    # the body as a whole
    _raw(b"", "empty request body", id="empty body"),
    _raw(b'{"inputs": [', "malformed JSON", id="invalid json"),
    _raw(b'{"inputs": "\xff"}', "malformed JSON", id="not utf-8"),
    _raw(b"[1, 2]", "must be a JSON object", id="json array"),
    _raw(b'"hello"', "must be a JSON object", id="json string"),
    _doc({"id": "1"}, "needs 'inputs'", id="no inputs"),
    _doc({"inputs": []}, "needs 'inputs'", id="empty inputs"),
    _doc({"inputs": {"name": "x"}}, "needs 'inputs'", id="inputs not a list"),
    _doc({"inputs": [3]}, "inputs[0] must be an object", id="input not an object"),
    # names, datatypes, shapes
    _doc({"inputs": [_NO_NAME]}, "inputs[0] needs a 'name'", id="input without name"),
    _doc({"inputs": [{"name": "", **_NO_NAME}]}, "inputs[0] needs a 'name'", id="input with empty name"),
    _doc({"inputs": _x()["inputs"] * 2}, "input 'x' is given twice", id="duplicate input"),
    _doc(_x(datatype="FP8"), "unsupported datatype 'FP8'", id="unknown datatype"),
    _doc(_x(datatype="fp32"), "expected one of", id="lowercase datatype"),
    _doc(_x(datatype=None), "unsupported datatype None", id="missing datatype"),
    _doc(_x(shape=[-1]), "non-negative integers", id="negative shape"),
    _doc(_x(shape=[1.0]), "non-negative integers", id="float shape"),
    _doc(_x(shape=[True]), "non-negative integers", id="bool shape"),
    _doc(_x(shape=["1"]), "non-negative integers", id="string shape"),
    _doc(_x(shape=1), "'shape' must be a list", id="shape not a list"),
    _doc(_x(shape=None), "'shape' must be a list", id="missing shape"),
    _doc(_x(shape=[1] * 17), "at most 16", id="too many dims"),
    # JSON data
    _doc({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, "needs 'data' or parameters.binary_data_size",
         id="no data"),
    _doc(_x(data=1.0), "'data' must be a list", id="data not a list"),
    _data("FP32", [2, 3], [1, 2, 3, 4, 5], "shape [2, 3] needs 6 elements, 'data' has 5", id="too few elements"),
    _data("INT8", [2], [1, 2, 3], "needs 2 elements, 'data' has 3", id="too many elements"),
    _data("BYTES", [3], ["a", "b"], "needs 3 elements, 'data' has 2", id="too few strings"),
    _data("FP32", [4], [[1, 2], [3]], "needs 4", id="ragged nested data, too few values"),
    _data("FP32", [2], [1.0, "2.0"], "FP32 data must be numbers", id="string in FP32"),
    _data("FP32", [2], [1.0, None], "FP32 data must be numbers", id="null in FP32"),
    _data("INT32", [1], [{"v": 1}], "INT32 data must be integers", id="object in INT32"),
    _data("INT32", [2], [1, 2.5], "INT32 data must be integers", id="float in INT32"),
    _data("INT64", [1], [3.0], "INT64 data must be integers", id="integral float in INT64"),
    _data("UINT8", [2], [1, 300], "UINT8 data must lie in [0, 255]", id="300 in UINT8"),
    _data("UINT32", [2], [-1, 5], "UINT32 data must lie in [0, 4294967295]", id="-1 in UINT32"),
    _data("INT8", [1], [-129], "INT8 data must lie in [-128, 127]", id="-129 in INT8"),
    _data("INT64", [1], [2**63], "INT64 data must lie in", id="2**63 in INT64"),
    _data("INT64", [2], [-1, 2**63], "INT64 data must lie in", id="-1 and 2**63 in INT64"),
    _data("UINT64", [2], [-1, 2**64 - 1], "UINT64 data must lie in", id="-1 and 2**64-1 in UINT64"),
    _data("INT32", [1], [2**31], "INT32 data must lie in", id="2**31 in INT32"),
    _data("FP32", [2], [1.0, 1e39], "out of range for FP32", id="FP64 value overflowing FP32"),
    _data("FP16", [1], [70000.0], "out of range for FP16", id="FP64 value overflowing FP16"),
    _data("FP16", [2], [1, 70000], "out of range for FP16", id="integer overflowing FP16"),
    _data("INT32", [2], [True, False], "INT32 data must be numbers, not true/false", id="bools in INT32"),
    _data("FP32", [2], [True, False], "FP32 data must be numbers, not true/false", id="bools in FP32"),
    _data("INT32", [2], [True, 2], "not true/false", id="bool among INT32"),
    _data("FP32", [2], [1.5, False], "not true/false", id="bool among FP32"),
    _data("UINT8", [2, 2], [[1, 2], [3, True]], "not true/false", id="bool among nested UINT8"),
    _data("BOOL", [2], [1, 0], "BOOL data must be true/false", id="numbers in BOOL"),
    _data("BYTES", [2], ["a", 5], "BYTES data must be strings, element 1 is int", id="number in BYTES"),
    _data("BYTES", [2, 1], [["a"], [None]], "element 1 is NoneType", id="nested null in BYTES"),
    # binary data
    _doc({"inputs": [_bin("FP32", [2], 16)]}, "binary_data_size 16 runs past the end of the body (8 binary bytes left)",
         _F32x2, id="binary size past the body"),
    _doc({"inputs": [_bin("FP32", [2], 8)]}, "runs past the end of the body", id="binary size without a tail"),
    _doc({"inputs": [_bin("FP32", [2], 8)]}, "add up to 8", _F32x2, b"\0" * 4, id="binary bytes left over"),
    _doc(_x(), "add up to 0", b"junk", id="binary tail without binary inputs"),
    _doc({"inputs": [_bin("FP32", [3], 8)]}, "binary_data_size is 8 bytes; shape [3] of FP32 needs 12", _F32x2,
         id="binary size not shape x itemsize"),
    _doc({"inputs": [_bin("FP32", [2], -8)]}, "binary_data_size must be a non-negative integer", _F32x2,
         id="negative binary size"),
    _doc({"inputs": [_bin("FP32", [2], "8")]}, "binary_data_size must be a non-negative integer", _F32x2,
         id="string binary size"),
    _doc({"inputs": [_bin("FP32", [2], 8, data=[1, 2])]}, "has both 'data' and binary_data_size", _F32x2,
         id="both data and binary size"),
    _doc({"inputs": [_bin("BYTES", [2], 10)]}, "ends inside element 1 of 2", _blen(b"abcd") + b"\1\0",
         id="BYTES length prefix cut"),
    _doc({"inputs": [_bin("BYTES", [1], 7)]}, "element 0 claims 10 bytes past the end", struct.pack("<I", 10) + b"abc",
         id="BYTES element runs past its data"),
    _doc({"inputs": [_bin("BYTES", [1], 6)]}, "has 1 bytes after its 1 elements", _blen(b"a") + b"z",
         id="BYTES trailing bytes"),
    _doc({"inputs": [_bin("BYTES", [3], 10)]}, "10 bytes cannot hold 3 elements", _blen(b"a", b"b"),
         id="BYTES too few elements"),
    # parameters, id, outputs
    _doc(_x(parameters=[1]), "input 'x': 'parameters' must be an object", id="input parameters not an object"),
    _req({"parameters": "fast"}, "request: 'parameters' must be an object", id="request parameters not an object"),
    _req({"id": 7}, "'id' must be a string", id="id not a string"),
    _req({"parameters": {"timeout": -1}}, "'timeout' must be a non-negative integer", id="negative timeout"),
    _req({"parameters": {"timeout": 1.5}}, "'timeout' must be a non-negative integer", id="float timeout"),
    _req({"parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or false",
         id="non-bool binary_data_output"),
    _req({"outputs": {"name": "y"}}, "'outputs' must be a list", id="outputs not a list"),
    _req({"outputs": [{"parameters": {}}]}, "outputs[0] needs a 'name'", id="output without name"),
    _out({"classification": 3}, "output 'y': the classification extension is not supported", id="classification"),
    _out({"binary_data": 1}, "output 'y': binary_data must be true or false", id="non-bool binary_data"),
    _out(1, "output 'y': 'parameters' must be an object", id="output parameters not an object"),
]


@pytest.mark.parametrize(("body", "header_length", "phrase"), _MALFORMED)
def test_malformed_request_is_invalid_input_saying_what_is_wrong(body, header_length, phrase):
    with pytest.raises(InvalidInput) as info:
        decode_request(body, header_length)
    assert phrase in str(info.value)
    assert info.value.status == 400


def test_errors_about_one_input_name_it():
    doc = {"inputs": [
        {"name": "good", "datatype": "FP32", "shape": [1], "data": [1.0]},
        {"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [256]},
    ]}
    with pytest.raises(InvalidInput, match=r"input 'pixels': UINT8 data must lie in \[0, 255\]"):
        _decode_doc(doc)


@pytest.mark.parametrize("header_length", [-1, 10_000])
def test_header_length_outside_the_body_is_invalid_input(header_length):
    body, _ = _body(_one("FP32", [1], [1.0]))
    expected = f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
    with pytest.raises(InvalidInput, match=expected):
        decode_request(body, header_length)


def test_header_length_cutting_the_json_short_is_malformed_json():
    inputs = [_triton_input("x", "INT32", np.arange(4, dtype=np.int32), True)]
    body, header_length = Client.generate_request_body(inputs)
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_request(body, header_length - 1)


def test_a_binary_body_sent_without_its_header_length_is_malformed_json():
    body, _ = Client.generate_request_body([_triton_input("x", "INT32", np.arange(4, dtype=np.int32), True)])
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_request(body, None)


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_absurd_shapes_with_a_zero_dim_are_invalid_input_not_a_crash(datatype, binary):
    shape = [0, 2**62, 2**62]
    tensor = _bin(datatype, shape, 0) if binary else {"name": "x", "datatype": datatype, "shape": shape, "data": []}
    with pytest.raises(InvalidInput, match=r"input 'x': shape \[0, 4611686018427387904, 46\d+\] is too large"):
        _decode_doc({"inputs": [tensor]})


def test_a_huge_binary_bytes_shape_is_rejected_before_allocating_it():
    # 2**40 elements would be an 8 TiB object array; 8 bytes of data hold at most 2.
    with pytest.raises(InvalidInput, match="binary BYTES data of 8 bytes cannot hold 1099511627776 elements"):
        _decode_doc({"inputs": [_bin("BYTES", [2**40], 8)]}, _blen(b"", b""))


# -- fuzz: anything at all is an InferRequest or InvalidInput ------------------
#
# Hypothesis picks the seeds; each example then decodes a few bodies made with a
# seeded RNG, which keeps thousands of bodies inside a couple of seconds.

_BODIES_PER_EXAMPLE = 8


def _check_decodes_or_rejects(body: bytes, header_length: int | None) -> None:
    try:
        request = decode_request(body, header_length)
    except InvalidInput as exc:
        assert str(exc)
        return
    except Exception:
        note(f"body={body!r} header_length={header_length!r}")
        raise
    assert isinstance(request, InferRequest) and request.inputs
    for tensor in request.inputs:
        assert tensor.data.shape == tensor.shape, (body, header_length)
        assert tensor.data.dtype == V2_TO_NUMPY[tensor.datatype], (body, header_length)


def _seed_bodies() -> list[tuple[bytes, int | None]]:
    seeds = []
    for binary in (False, True):
        inputs = [
            _triton_input("a", "FP32", np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), binary),
            _triton_input("b", "BYTES", np.array([b"hi", b"", b"there"], dtype=object), binary),
            _triton_input("c", "UINT8", np.arange(4, dtype=np.uint8), not binary),
            _triton_input("d", "BOOL", np.array([[True], [False]]), binary),
            _triton_input("e", "UINT64", np.array([0, 2**64 - 1], dtype=np.uint64), binary),
        ]
        outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
        seeds.append(Client.generate_request_body(inputs, outputs=outputs, request_id="r1", timeout=100))
    seeds.append(_body({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}))
    return seeds


_SEEDS = _seed_bodies()
_FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(_FUZZ, max_examples=600)
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-2, 220)))
def test_fuzz_random_bytes(body, header_length):
    _check_decodes_or_rejects(body, header_length)


_TOKENS = [b"0", b"9", b"-", b"[", b"]", b"{", b"}", b",", b":", b'"', b"\x00", b"1e9", b"true", b"null", b"-1",
           b"18446744073709551616"]


def _mutate(rng: random.Random, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
    """A valid body cut, overwritten, spliced or re-framed."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["truncate", "flip", "insert", "delete"])
        pos = rng.randint(0, max(len(data) - 1, 0))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] = rng.randint(0, 255)
        elif op == "insert":
            data[pos:pos] = rng.choice(_TOKENS)
        elif op == "delete":
            del data[pos : pos + rng.randint(1, 8)]
    if header_length is not None:
        header_length = rng.choice([header_length, header_length + rng.randint(-4, 4), None, len(data)])
    return bytes(data), header_length


@_FUZZ
@given(st.sampled_from(_SEEDS), st.randoms(use_true_random=True))
def test_fuzz_mutated_valid_bodies(seed, rng):
    for _ in range(_BODIES_PER_EXAMPLE):
        _check_decodes_or_rejects(*_mutate(rng, *seed))


# Values that go wrong in interesting ways wherever a field of a request goes.
_ODD = [
    None, True, False, 0, -1, 3, 1.5, -0.0, 1e39, 2**31, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, "", "x", "FP32",
    "BYTES", [], [0], [1], [-1], [2, 2], [1.0], [True], ["1"], [None], [[1, 2], [3]], [[1], ["a"]], [[[]]],
    [0, 2**62, 2**62], [2**64 - 1, 0], [1, True], {}, {"a": 1}, {"binary_data_size": 4}, {"binary_data": "yes"},
    {"classification": 1}, {"timeout": -5}, [{"name": "y"}], [{"name": 1}], [{}],
]
_SCALARS = [0, 1, -1, 2, 255, 256, -129, 70000, 2**63, 2**64 - 1, 2**64, 0.5, -0.0, 1e39, True, False, None, "a", [],
            [1]]


def _nest(flat: list, shape: list) -> list:
    """`flat` as nested lists of `shape` (row-major), whatever its elements are."""
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _structured(rng: random.Random) -> tuple[bytes, int | None]:
    """A mostly well-formed request with one or two odd values where fields go, and binary tails."""
    pick = rng.choice
    odd = lambda p: rng.random() < p  # noqa: E731
    tensors, tails = [], []
    for i in range(rng.randint(1, 3)):
        datatype = pick(_ALL) if not odd(0.05) else pick(["FP8", "fp32", 3, None])
        shape = [pick([0, 1, 1, 2, 2, 3]) for _ in range(rng.randint(0, 3))]
        if odd(0.1):
            shape.append(pick([-1, 2**31, 2**62, 2**64 - 1, 1.0, True]))
        regular = all(type(d) is int and 0 <= d < 100 for d in shape)
        count = int(np.prod(shape)) if regular else rng.randint(0, 4)
        name = f"in{i}" if not odd(0.05) else pick(["", 0, "in0"])
        tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
        if odd(0.1):
            tensor["shape"] = pick(_ODD)
        if odd(0.5):
            itemsize = V2_TO_NUMPY[datatype].itemsize if datatype in V2_TO_NUMPY and datatype != "BYTES" else 0
            tail = (
                b"".join(struct.pack("<I", n) + rng.randbytes(n) for n in (rng.randint(0, 5) for _ in range(count)))
                if datatype == "BYTES"
                else rng.randbytes(count * itemsize)
            )
            if odd(0.2):
                tail = tail[: rng.randint(0, len(tail))] + rng.randbytes(pick([0, 1, 4]))
            tensor["parameters"] = {"binary_data_size": len(tail) if not odd(0.1) else pick(_ODD)}
            tails.append(tail)
        else:
            values = [True, False] if datatype == "BOOL" else ["ab", ""] if datatype == "BYTES" else [0, 1, 7, -3, 2.5]
            data = [pick(values) if not odd(0.05) else pick(_SCALARS) for _ in range(count + (odd(0.05) and 1))]
            if odd(0.1) and regular and shape and len(data) == count:
                data = _nest(data, shape)
            tensor["data"] = data if not odd(0.05) else pick(_ODD)
        if odd(0.05):
            tensor["parameters"] = pick([{"binary_data_size": True}, {"binary_data_size": None}, {"z": 1}, *_ODD])
        tensors.append(tensor)
    doc: dict = {"inputs": tensors}
    good_fields = {"id": "r", "parameters": {"timeout": 5, "binary_data_output": True}, "outputs": [{"name": "y"}]}
    for key, good in good_fields.items():
        if odd(0.3):
            doc[key] = good if not odd(0.2) else pick(_ODD)
    header = json.dumps(doc).encode()
    tail = b"".join(tails) + (rng.randbytes(pick([1, 4])) if odd(0.05) else b"")
    if not tail and odd(0.5):
        return header, None
    return header + tail, len(header) if not odd(0.05) else len(header) + rng.randint(-2, 2)


@_FUZZ
@given(st.randoms(use_true_random=True))
def test_fuzz_structured_requests(rng):
    for _ in range(_BODIES_PER_EXAMPLE):
        _check_decodes_or_rejects(*_structured(rng))
