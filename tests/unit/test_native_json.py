"""`parse_v2_json`: the compiled kernel and the orjson + NumPy reference agree.

Same document, same arrays (dtype, shape and bits), same exception type for the
same bad body; the compiled kernel's messages carry the byte offset.
"""

from __future__ import annotations

import math
import struct
import sys

import numpy as np
import orjson
import pytest

from native import _core, _reference
from native._reference.v2json import DTYPES

IMPLS = [pytest.param(_core.parse_v2_json, id="native"), pytest.param(_reference.parse_v2_json, id="numpy")]

INT_TYPES = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
FLOAT_TYPES = ["FP16", "FP32", "FP64"]


def same(a, b) -> bool:
    """Equal as documents: same types, arrays of the same dtype/shape/bits, floats to the bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == object:
            return all(type(x) is type(y) and x == y for x, y in zip(a.ravel(), b.ravel()))
        return a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def outcome(impl, body):
    """("ok", document) or ("error", exception type, message)."""
    try:
        return ("ok", impl(body))
    except (ValueError, TypeError) as exc:
        return ("error", type(exc), str(exc))


def assert_parity(body) -> dict | None:
    """Both implementations give the same document, or both raise the same exception type."""
    native, reference = outcome(_core.parse_v2_json, body), outcome(_reference.parse_v2_json, body)
    assert native[0] == reference[0], (body[:300], native, reference)
    if native[0] == "ok":
        assert same(native[1], reference[1]), (body[:300], native[1], reference[1])
        return native[1]
    assert native[1] is reference[1], (body[:300], native, reference)
    if native[1] is ValueError:
        assert native[2].startswith("byte "), native[2]
    return None


def request(*inputs, **extra) -> bytes:
    return orjson.dumps({"id": "r1", "inputs": list(inputs), **extra})


def tensor(datatype, shape, data, name="x", order=("name", "shape", "datatype", "data")):
    fields = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    return {k: fields[k] for k in order}


def nest(flat: list, shape: list) -> list:
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


# -- every datatype, flat and nested, both key orders ---------------------------------------


def _values(rng, datatype: str, count: int) -> list:
    if datatype == "BOOL":
        return [bool(v) for v in rng.integers(0, 2, count)]
    if datatype == "BYTES":
        pool = ["", "a", "héllo", "quote\"back\\slash", "tab\tnew\nline", "\u0000nul", "😀 emoji", "/slash"]
        return [pool[i] for i in rng.integers(0, len(pool), count)]
    if datatype in INT_TYPES:
        info = np.iinfo(DTYPES[datatype])
        edge = [int(info.min), int(info.max), 0, -1 if info.min < 0 else 1]
        body = [int(v) for v in rng.integers(info.min, info.max, count, dtype=np.int64 if info.min < 0 else np.uint64,
                                             endpoint=True)]
        return (edge + body)[:count]
    big = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": 1.7976931348623157e308}[datatype]
    tiny = {"FP16": 6e-8, "FP32": 1.401298464324817e-45, "FP64": 5e-324}[datatype]
    ints = [2**63, 2**64 - 1, -(2**63)] if datatype != "FP16" else [2048, -2048, 65504]
    edge = [0.0, -0.0, 0, -0, 1, big, -big, tiny, -tiny, *ints]
    body = list(rng.standard_normal(count) * 10.0 ** rng.integers(-8, 8, count))
    return (edge + [float(v) for v in body])[:count]


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES", *INT_TYPES, *FLOAT_TYPES])
@pytest.mark.parametrize("shape", [[0], [1], [7], [3, 4], [2, 0, 3], [2, 3, 2], []])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("datatype_first", [True, False])
def test_every_datatype_flat_and_nested_agrees_with_the_reference(datatype, shape, nested, datatype_first):
    rng = np.random.default_rng(len(shape) * 31 + len(datatype))
    count = math.prod(shape)
    values = _values(rng, datatype, count)
    data = nest(values, shape) if nested else values
    order = ("name", "shape", "datatype", "data") if datatype_first else ("data", "name", "datatype", "shape")
    doc = assert_parity(request(tensor(datatype, shape, data, order=order)))
    array = doc["inputs"][0]["data"]
    assert array.dtype == DTYPES[datatype] and array.shape == tuple(shape)
    if datatype == "BYTES":
        assert list(array.ravel()) == [v.encode() for v in values]
    elif datatype in INT_TYPES or datatype == "BOOL":
        np.testing.assert_array_equal(array.ravel(), np.array(values, dtype=DTYPES[datatype]))
    else:
        with np.errstate(over="ignore"):
            expected = np.array([float(v) for v in values]).astype(array.dtype)
        np.testing.assert_array_equal(array.ravel(), expected)


@pytest.mark.parametrize("datatype", FLOAT_TYPES)
def test_floats_are_the_double_rounded_once_to_the_type(datatype):
    # Numbers in many spellings, each read as the exact double, then rounded to the type.
    texts = ["0.1", "-0.0", "1E5", "1e+5", "2.5e-3", "123456789012345678", "9007199254740993", "0.30000000000000004",
             "1.00000000000000011102230246251565404236316680908203125", "3.4028235677973366e38", "65519.999",
             "6.103515625e-05", "2.9802322387695312e-08", "1e-400", "-1e-400", "4.9e-324", "1.7976931348623157e308",
             "18446744073709551616", "-9223372036854775809", "0.000000000000000000000000000001234567890123456789"]
    rng = np.random.default_rng(3)
    texts += [repr(float(np.float32(v))) for v in rng.standard_normal(200)]
    texts += [f"{v:.{p}e}" for v, p in zip(rng.standard_normal(200) * 1e20, rng.integers(0, 20, 200))]
    with np.errstate(over="ignore"):
        doubles = np.array([float(t) for t in texts])
        finite = np.isfinite(doubles.astype(DTYPES[datatype]))
    texts = [t for t, ok in zip(texts, finite) if ok]
    body = ('{"inputs":[{"name":"x","shape":[%d],"datatype":"%s","data":[%s]}]}' % (len(texts), datatype, ",".join(texts)))
    doc = assert_parity(body.encode())
    expected = np.array([float(t) for t in texts]).astype(DTYPES[datatype])
    assert doc["inputs"][0]["data"].tobytes() == expected.tobytes()


def test_a_large_body_agrees_and_covers_the_released_gil_paths():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(40000).astype(np.float32)
    ints = rng.integers(-1000, 1000, 40000)
    body = request(tensor("FP32", [200, 200], x.reshape(200, 200).tolist()),
                   tensor("INT32", [40000], ints.tolist(), name="i", order=("data", "name", "shape", "datatype")))
    assert len(body) > 64 * 1024
    doc = assert_parity(body)
    np.testing.assert_array_equal(doc["inputs"][0]["data"], x.reshape(200, 200))
    np.testing.assert_array_equal(doc["inputs"][1]["data"], ints.astype(np.int32))


def test_a_request_as_tritonclient_writes_it():
    tc = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(1).standard_normal((2, 784)).astype(np.float32)
    t = tc.InferInput("input", [2, 784], "FP32")
    t.set_data_from_numpy(x, binary_data=False)
    body, _ = tc.InferenceServerClient.generate_request_body([t], outputs=[tc.InferRequestedOutput("y")])
    doc = assert_parity(body)
    np.testing.assert_array_equal(doc["inputs"][0]["data"], x)


# -- the rest of the document is orjson's --------------------------------------------------------


DOCUMENTS = {
    "no inputs": b'{"id": "a", "parameters": {"x": [1, 2.5, null, true, {"y": "\\u00e9\\ud83d\\ude00"}]}}',
    "top-level list": b'[{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}]',
    "top-level scalar": b' "text" ',
    "inputs not a list": b'{"inputs": {"datatype": "FP32", "shape": [1], "data": [1]}}',
    "inputs of non-objects": b'{"inputs": [1, "x", null, [1, 2]]}',
    "binary input left alone": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], '
                               b'"parameters": {"binary_data_size": 8}}]}',
    "escaped keys": b'{"in\\u0070uts": [{"d\\u0061ta": [1, 2], "datatype": "INT8", "shape": [2]}]}',
    "duplicate datatype after data": b'{"inputs": [{"datatype": "FP32", "shape": [2], "data": [1, 2], '
                                     b'"datatype": "INT64"}]}',
    "duplicate shape after data": b'{"inputs": [{"datatype": "FP32", "shape": [2], "data": [1, 2], "shape": [1, 2]}]}',
    "duplicate data": b'{"inputs": [{"datatype": "UINT8", "shape": [1], "data": [1, 2], "data": [3]}]}',
    "duplicate inputs, first bad": b'{"inputs": [{"datatype": "UINT8", "shape": [1], "data": [300]}], '
                                   b'"inputs": [{"datatype": "UINT8", "shape": [1], "data": [3]}]}',
    "outputs and parameters": b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [2], "data": [true, false]}], '
                              b'"outputs": [{"name": "y", "parameters": {"binary_data": true}}], '
                              b'"parameters": {"timeout": 18446744073709551615, "big": 18446744073709551616, '
                              b'"neg": -9223372036854775808, "negbig": -9223372036854775809, "z": -0, "zf": -0.0}}',
    "whitespace everywhere": b' \t\r\n{ "inputs" : [ { "shape" : [ 2 , 1 ] , "datatype" : "FP64" , '
                             b'"data" : [ [ 1.5 ] , [ -2 ] ] } ] } \n',
    "empty containers": b'{"inputs": [], "a": {}, "b": [[]], "c": ""}',
    "deep nesting in data": b'{"inputs": [{"datatype": "INT16", "shape": [1], "data": ' + b"[" * 50 + b"7" + b"]" * 50
                            + b"}]}",
    "ragged nesting in data": b'{"inputs": [{"datatype": "INT16", "shape": [3], "data": [[1], [2, [3]]]}]}',
}


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_documents_agree_with_the_reference(name):
    assert_parity(DOCUMENTS[name])


def test_a_later_key_decides_what_the_data_means():
    doc = _core.parse_v2_json(DOCUMENTS["duplicate datatype after data"])
    assert doc["inputs"][0]["data"].dtype == np.int64
    doc = _core.parse_v2_json(DOCUMENTS["duplicate shape after data"])
    assert doc["inputs"][0]["data"].shape == (1, 2)
    doc = _core.parse_v2_json(DOCUMENTS["duplicate data"])
    assert doc["inputs"][0]["data"].tolist() == [3]
    assert list(_core.parse_v2_json(DOCUMENTS["escaped keys"])["inputs"][0]) == ["data", "datatype", "shape"]


@pytest.mark.parametrize("depth", [1023, 1024, 1025])
def test_the_nesting_limit_is_orjsons(depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5000))  # `same` recurses as deep as the documents
    try:
        _nesting(depth)
    finally:
        sys.setrecursionlimit(limit)


def _nesting(depth):
    assert_parity(b"[" * depth + b"]" * depth)
    inner = b"[" * (depth - 3) + b"1" + b"]" * (depth - 3)
    assert_parity(b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": ' + inner + b"}]}")


@pytest.mark.parametrize("make", [bytes, bytearray, lambda b: memoryview(b), lambda b: memoryview(b"  " + b)[2:]])
def test_bytes_like_bodies(make):
    body = request(tensor("INT32", [2], [1, 2]))
    doc = _core.parse_v2_json(make(body))
    assert same(doc, _reference.parse_v2_json(make(body)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("body", ["{}", None, 5, [b"{}"], memoryview(b"{} {}")[::2]])
def test_a_body_that_is_not_bytes_is_a_type_error(impl, body):
    with pytest.raises(TypeError, match="^body:"):
        impl(body)


# -- errors: ValueError with what was expected, and where --------------------------------------


def _bad(datatype, shape, data):
    return request(tensor(datatype, shape, data))


BAD_TENSORS = {
    "uint8 300": _bad("UINT8", [2], [1, 300]),
    "uint8 -1": _bad("UINT8", [1], [-1]),
    "int8 128": _bad("INT8", [1], [128]),
    "int8 -129": _bad("INT8", [1], [-129]),
    "int16 max+1": _bad("INT16", [1], [32768]),
    "uint16 max+1": _bad("UINT16", [1], [65536]),
    "int32 max+1": _bad("INT32", [1], [2**31]),
    "uint32 max+1": _bad("UINT32", [1], [2**32]),
    "int64 max+1": _bad("INT64", [1], [2**63]),
    "uint64 max+1": b'{"inputs":[{"datatype":"UINT64","shape":[1],"data":[18446744073709551616]}]}',
    "int32 1.5": _bad("INT32", [2], [1, 1.5]),
    "int32 1.0": _bad("INT32", [1], [1.0]),
    "int64 1e3": b'{"inputs":[{"datatype":"INT64","shape":[1],"data":[1e3]}]}',
    "int8 true": _bad("INT8", [1], [True]),
    "fp32 true": _bad("FP32", [2], [1.0, True]),
    "fp32 string": _bad("FP32", [1], ["1.0"]),
    "fp32 null": _bad("FP32", [1], [None]),
    "fp32 object": _bad("FP32", [1], [{"a": 1}]),
    "fp32 1e39": b'{"inputs":[{"datatype":"FP32","shape":[1],"data":[1e39]}]}',
    "fp16 65520": _bad("FP16", [1], [65520]),
    "fp16 1e5": _bad("FP16", [1], [1e5]),
    "bool 1": _bad("BOOL", [1], [1]),
    "bool string": _bad("BOOL", [1], ["true"]),
    "bytes number": _bad("BYTES", [2], ["a", 1]),
    "bytes null": _bad("BYTES", [1], [None]),
    "count short": _bad("FP32", [3], [1, 2]),
    "count long": _bad("FP32", [2, 2], [[1, 2], [3, 4], [5, 6]]),
    "scalar shape needs one": _bad("FP32", [], []),
    "no datatype": b'{"inputs":[{"shape":[1],"data":[1]}]}',
    "unknown datatype": _bad("FP8", [1], [1]),
    "datatype not a string": b'{"inputs":[{"datatype":32,"shape":[1],"data":[1]}]}',
    "no shape": b'{"inputs":[{"datatype":"FP32","data":[1]}]}',
    "shape not a list": b'{"inputs":[{"datatype":"FP32","shape":1,"data":[1]}]}',
    "shape negative": _bad("FP32", [-1], [1]),
    "shape bool": b'{"inputs":[{"datatype":"FP32","shape":[true],"data":[1]}]}',
    "shape float": b'{"inputs":[{"datatype":"FP32","shape":[1.0],"data":[1]}]}',
    "shape 33 dims": _bad("FP32", [1] * 33, [1]),
    "shape too large": _bad("FP32", [2**40, 2**40], [1]),
    "shape beyond int64": b'{"inputs":[{"datatype":"FP32","shape":[0, 9223372036854775808],"data":[]}]}',
    "data not a list": _bad("FP32", [1], 1.0),
    "data a string": _bad("BYTES", [1], "abc"),
    "second input bad": request(tensor("FP32", [1], [1]), tensor("UINT8", [1], [256], name="y")),
}


@pytest.mark.parametrize("name", list(BAD_TENSORS))
def test_a_tensor_the_datatype_refuses_is_a_value_error_in_both(name):
    body = BAD_TENSORS[name]
    for impl in (_core.parse_v2_json, _reference.parse_v2_json):
        with pytest.raises(ValueError) as info:
            impl(body)
        assert type(info.value) is ValueError
    native = str(pytest.raises(ValueError, _core.parse_v2_json, body).value)
    reference = str(pytest.raises(ValueError, _reference.parse_v2_json, body).value)
    offset, _, text = native.partition(": ")
    assert offset.startswith("byte ") and 0 <= int(offset[5:]) <= len(body), native
    assert text == reference  # the same words, the kernel's with the offset in front


def test_the_offset_points_at_the_refused_element():
    body = b'{"inputs":[{"name":"x","datatype":"UINT8","shape":[4],"data":[1, 2, 300, 4]}]}'
    message = str(pytest.raises(ValueError, _core.parse_v2_json, body).value)
    assert message == f"byte {body.index(b'300')}: inputs[0].data[2]: expected an integer in [0, 255] for UINT8"
    body = b'{"inputs":[{"datatype":"FP32","shape":[3],"data":[[1.5], [2.5, true]]}]}'
    message = str(pytest.raises(ValueError, _core.parse_v2_json, body).value)
    assert message.startswith(f"byte {body.index(b'true')}: inputs[0].data[2]: expected a number for FP32")


MALFORMED = [b"", b" ", b"{", b"}", b'{"inputs": [1, 2,]}', b'{"a" 1}', b'{"a": 1,}', b"[1 2]", b"NaN", b"[Infinity]",
             b"[-Infinity]", b'{"inputs":[{"datatype":"FP32","shape":[1],"data":[NaN]}]}', b"[01]", b"[1.]", b"[.5]",
             b"[1e]", b"[+1]", b"[-]", b'["\\x"]', b'["\\u12"]', b'["\\ud800"]', b'["\\udc00"]', b'["a\x01"]',
             b'["\xff"]', b'["\xed\xa0\x80"]', b'["\xc0\x80"]', b"\xef\xbb\xbf{}", b"{} {}", b"[1]]", b"tru", b"nul",
             b"[1e400]", b'{"inputs":[{"datatype":"FP64","shape":[1],"data":[1e400]}]}', b"[" * 1025 + b"]" * 1025,
             b'{"inputs":[{"datatype":"FP32","shape":[2],"data":[1,2]' + b"]" * 3, b'{"a":1}\x00']


@pytest.mark.parametrize("body", MALFORMED, ids=[repr(b[:30]) for b in MALFORMED])
def test_malformed_json_is_a_value_error_in_both(body):
    assert assert_parity(body) is None


def test_a_message_says_what_was_expected():
    message = str(pytest.raises(ValueError, _core.parse_v2_json, b'{"inputs": [1 2]}').value)
    assert message == "byte 14: expected ',' or ']'"
    assert "byte 0:" in str(pytest.raises(ValueError, _core.parse_v2_json, b"").value)
