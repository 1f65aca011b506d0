"""KServe v2 codec against the real tritonclient encoder/decoder, its error messages, and a fuzz.

A request built by `tritonclient.http` must decode to exactly the arrays the
client sent, a response we encode must parse in `tritonclient.http` to exactly
the arrays we meant, and no body whatsoever may escape as anything but
InvalidInput (the ingress turns that into a 400; anything else is a 500).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from serving.datatypes import V2_TO_NUMPY
from serving.protocol import decode_request, encode_response

from _v2_helpers import Client, _ALL, _FLOATS, _INTS, _body, _decode_doc, _one, _same, _sample, _triton_input

# -- decoding what tritonclient sends ------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", _ALL)
def test_every_datatype_from_tritonclient_decodes_exactly(datatype, binary):
    arr = _sample(datatype, utf8_only=not binary)
    body, header_length = Client.generate_request_body([_triton_input("x", datatype, arr, binary)])
    assert (header_length is not None) == binary

    request = decode_request(body, header_length)

    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (2, 3))
    _same(tensor.data, arr)


def test_mixed_json_and_binary_inputs_are_matched_to_their_own_bytes():
    arrays = {
        "a": ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3) / 7, True),
        "b": ("INT64", np.array([[-(2**63), 2**63 - 1]]), False),
        "c": ("BYTES", np.array([b"first", b"", b"\x00\x01"], dtype=object), True),
        "d": ("BOOL", np.array([True]), False),
        "e": ("UINT16", np.array([[[65535]], [[7]]], dtype=np.uint16), True),
    }
    inputs = [_triton_input(n, dt, arr, binary) for n, (dt, arr, binary) in arrays.items()]
    body, header_length = Client.generate_request_body(inputs)

    request = decode_request(body, header_length)

    assert [t.name for t in request.inputs] == list(arrays)
    for tensor in request.inputs:
        _same(tensor.data, arrays[tensor.name][1])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8", "BOOL", "BYTES"])
def test_empty_tensors_decode_to_empty_arrays_of_the_right_shape(datatype, binary):
    arr = np.empty((2, 0, 3), dtype=V2_TO_NUMPY[datatype])
    body, header_length = Client.generate_request_body([_triton_input("x", datatype, arr, binary)])

    (tensor,) = decode_request(body, header_length).inputs

    assert tensor.data.shape == (2, 0, 3)
    assert tensor.data.dtype == V2_TO_NUMPY[datatype]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_scalar_tensor_with_shape_of_no_dims_decodes(binary):
    arr = np.array(3.5, dtype=np.float64)
    body, header_length = Client.generate_request_body([_triton_input("x", "FP64", arr, binary)])

    (tensor,) = decode_request(body, header_length).inputs

    _same(tensor.data, arr)


def test_request_id_timeout_and_custom_parameters_are_carried_through():
    arr = np.ones((1, 4), dtype=np.float32)
    body, header_length = Client.generate_request_body(
        [_triton_input("x", "FP32", arr, True)],
        request_id="req-\u00e9-42",
        timeout=2_500,
        parameters={"tenant": "acme", "retries": 3},
    )

    request = decode_request(body, header_length)

    assert request.id == "req-\u00e9-42"
    assert request.timeout_us == 2_500
    assert request.parameters["tenant"] == "acme" and request.parameters["retries"] == 3
    # tritonclient asks for every output in binary when it names none.
    assert request.outputs is None
    assert request.binary_output is True


def test_requested_outputs_keep_their_order_and_binary_flags():
    arr = np.ones((1, 4), dtype=np.float32)
    outputs = [httpclient.InferRequestedOutput("probs", binary_data=False), httpclient.InferRequestedOutput("label")]
    body, header_length = Client.generate_request_body([_triton_input("x", "FP32", arr, False)], outputs=outputs)

    request = decode_request(body, header_length)

    assert [(o.name, o.binary) for o in request.outputs] == [("probs", False), ("label", True)]
    assert request.binary_output is False
    assert request.id is None and request.timeout_us is None


def test_output_without_binary_flag_defers_to_the_request_default():
    doc = _one("FP32", [1], [1.0])
    doc["outputs"] = [{"name": "probs"}, {"name": "label", "parameters": {"binary_data": False}}]
    doc["parameters"] = {"binary_data_output": True}

    request = _decode_doc(doc)

    assert [(o.name, o.binary) for o in request.outputs] == [("probs", None), ("label", False)]
    assert request.binary_output is True


def test_nested_and_flat_json_data_decode_to_the_same_array():
    want = np.arange(12, dtype=np.int32).reshape(2, 3, 2)
    flat = _decode_doc(_one("INT32", [2, 3, 2], want.ravel().tolist())).inputs[0].data
    nested = _decode_doc(_one("INT32", [2, 3, 2], want.tolist())).inputs[0].data
    _same(flat, want)
    _same(nested, want)
    words = _decode_doc(_one("BYTES", [2, 2], [["a", "b"], ["c", "d"]])).inputs[0].data
    _same(words, np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object))


def test_json_integers_are_accepted_in_float_tensors_and_keep_their_value():
    got = _decode_doc(_one("FP64", [3], [1, -(2**53), 2.5])).inputs[0].data
    _same(got, np.array([1.0, -(2.0**53), 2.5]))


def test_the_largest_uint64_survives_json():
    got = _decode_doc(_one("UINT64", [2], [0, 2**64 - 1])).inputs[0].data
    _same(got, np.array([0, 2**64 - 1], dtype=np.uint64))


def test_binary_body_without_binary_inputs_is_fine_when_header_length_is_the_whole_body():
    body, _ = _body(_one("FP32", [1], [2.0]))
    (tensor,) = decode_request(body, len(body)).inputs
    _same(tensor.data, np.array([2.0], dtype=np.float32))


# -- encoding what tritonclient reads ------------------------------------------


def _parse(body: bytes, header_length: int | None):
    return Client.parse_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", _ALL)
def test_every_datatype_encodes_to_what_tritonclient_reads_back(datatype, binary):
    arr = _sample(datatype, utf8_only=not binary)

    body, header_length = encode_response("m", "3", [("y", datatype, arr, binary)])

    assert (header_length is not None) == binary
    got = _parse(body, header_length).as_numpy("y")
    if datatype == "BYTES" and not binary:
        # tritonclient hands JSON strings back as str; the UTF-8 bytes must match.
        got = np.array([s.encode() for s in got.ravel()], dtype=object).reshape(got.shape)
    _same(got, arr)


def test_json_and_binary_outputs_mix_in_one_response():
    outputs = [
        ("probs", "FP32", np.array([[0.25, 0.75], [1e-30, 1.0]], dtype=np.float32), True),
        ("label", "BYTES", np.array([[b"ok"], [b"\xffraw"]], dtype=object), True),
        ("count", "INT64", np.array([2**63 - 1, -5]), False),
        ("flags", "BOOL", np.array([[True, False]]), False),
        ("half", "FP16", np.array([65504.0, -0.0], dtype=np.float16), True),
        ("empty", "UINT8", np.empty((0, 4), dtype=np.uint8), True),
        ("words", "BYTES", np.array(["caf\u00e9", "x"], dtype=object), False),
    ]

    body, header_length = encode_response("fraud", "2", outputs, request_id="abc")

    result = _parse(body, header_length)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("fraud", "2", "abc")
    assert [o["name"] for o in response["outputs"]] == [o[0] for o in outputs]
    for name, _, arr, _ in outputs[:-1]:
        _same(result.as_numpy(name), arr)
    assert result.as_numpy("words").tolist() == ["caf\u00e9", "x"]


def test_a_response_with_only_json_outputs_is_plain_json():
    body, header_length = encode_response("m", "1", [("y", "FP32", np.array([1.5], dtype=np.float32), False)])
    assert header_length is None
    doc = json.loads(body)
    assert doc == {"model_name": "m", "model_version": "1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [1], "data": [1.5]}
    ]}


def test_non_contiguous_and_big_endian_outputs_are_sent_in_row_major_little_endian():
    base = np.arange(6, dtype=np.int32).reshape(2, 3)
    transposed = base.T  # a view in Fortran order
    big = np.arange(4, dtype=">f8").reshape(2, 2) + 0.5
    outputs = [("t_bin", "INT32", transposed, True), ("t_json", "INT32", transposed, False), ("big", "FP64", big, True)]

    result = _parse(*encode_response("m", "1", outputs))

    _same(result.as_numpy("t_bin"), np.ascontiguousarray(transposed))
    _same(result.as_numpy("t_json"), np.ascontiguousarray(transposed))
    _same(result.as_numpy("big"), big.astype("<f8"))


def test_response_parameters_are_sent():
    body, header_length = encode_response(
        "m", "1", [("y", "INT8", np.array([1], dtype=np.int8), True)], parameters={"sequence_end": True}
    )
    assert _parse(body, header_length).get_response()["parameters"] == {"sequence_end": True}


# -- properties: any array tritonclient can send or read round-trips -----------

_NUMERIC_DTYPES = {dt: V2_TO_NUMPY[dt] for dt in ["BOOL", *_INTS, *_FLOATS]}
_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def _tensors(draw):
    datatype = draw(st.sampled_from(list(_NUMERIC_DTYPES) + ["BYTES"]))
    shape = draw(_shapes)
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return datatype, arr.reshape(shape)
    dtype = _NUMERIC_DTYPES[datatype]
    elements = None
    if datatype in _FLOATS:  # finite only: JSON has no NaN/Infinity
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False)
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


def _json_safe(datatype: str, arr: np.ndarray) -> bool:
    if datatype != "BYTES":
        return True
    try:
        for item in arr.ravel():
            item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(st.lists(st.tuples(_tensors(), st.booleans()), min_size=1, max_size=4))
def test_any_tritonclient_request_decodes_exactly(tensors):
    inputs, want = [], []
    for i, ((datatype, arr), binary) in enumerate(tensors):
        binary = binary or not _json_safe(datatype, arr)
        inputs.append(_triton_input(f"in{i}", datatype, arr, binary))
        want.append(arr)
    body, header_length = Client.generate_request_body(inputs)

    request = decode_request(body, header_length)

    assert len(request.inputs) == len(want)
    for tensor, arr in zip(request.inputs, want):
        _same(tensor.data, arr)


@_FAST
@given(st.lists(st.tuples(_tensors(), st.booleans()), min_size=1, max_size=4))
def test_any_response_parses_exactly_in_tritonclient(tensors):
    outputs = []
    for i, ((datatype, arr), binary) in enumerate(tensors):
        outputs.append((f"out{i}", datatype, arr, binary or not _json_safe(datatype, arr)))

    result = _parse(*encode_response("m", "1", outputs))

    for name, datatype, arr, binary in outputs:
        got = result.as_numpy(name)
        if datatype == "BYTES" and not binary:
            got = np.array([s.encode() for s in got.ravel()], dtype=object).reshape(got.shape)
        _same(got, arr)


