"""Fuzzing `parse_v2_json`: mutated and truncated bodies never crash the kernel.

Every body, however broken, gives the reference's document or, where the
reference raises ValueError, a ValueError: never a crash, another exception,
or a different document. (The sanitizer build runs this file too: `make sanitize`.)
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import _core, _reference
from test_native_json import outcome, same

SEEDS = [
    orjson.dumps({"id": "a", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[0.5, -1.25e-3, 3], [1e10, -0.0, 7.125]]},
        {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["h\u00e9llo", "a\"b\\c\n\u0000\U0001F600"]},
    ], "outputs": [{"name": "y"}]}),
    b'{"inputs":[{"data":[1,2,255,0],"datatype":"UINT8","shape":[2,2],"name":"img"},'
    b'{"name":"m","datatype":"BOOL","shape":[3],"data":[true,false,true]}],"parameters":{"timeout":10}}',
    b'{"inputs":[{"name":"i","datatype":"INT64","shape":[3],"data":[-9223372036854775808,0,9223372036854775807]},'
    b'{"name":"u","datatype":"UINT64","shape":[1],"data":[18446744073709551615]},'
    b'{"name":"h","datatype":"FP16","shape":[2],"data":[65504,6e-08]},'
    b'{"name":"b","datatype":"INT8","shape":[1],"parameters":{"binary_data_size":1}}]}',
    b' { "inputs" : [ { "name" : "d" , "datatype" : "FP64" , "shape" : [ 1 , 2 ] ,'
    b' "data" : [ [ 1.7976931348623157e308 , -5e-324 ] ] } ] , "x" : [ null , { } , [ ] , "\\ud83d\\ude00" ] } ',
    orjson.dumps({"inputs": [{"name": "x", "shape": [1, 40], "datatype": "FP32",
                              "data": np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32).tolist()}]}),
]

# Bytes that matter to JSON, to flip into a body more often than chance would.
SPECIAL = list(b'{}[]:,"\\-+.eE0123456789tfnul \t\n\r') + [0x00, 0x1F, 0x7F, 0x80, 0xC0, 0xED, 0xF4, 0xFF]


def check(body: bytes) -> None:
    reference = outcome(_reference.parse_v2_json, body)
    native = outcome(_core.parse_v2_json, body)
    assert reference[0] != "error" or reference[1] is ValueError, reference
    assert native[0] == reference[0], (body, native, reference)
    if native[0] == "ok":
        assert same(native[1], reference[1]), (body, native[1], reference[1])
    else:
        assert native[1] is ValueError and native[2].startswith("byte "), (body, native)


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "special"]), st.integers(0, 10**6),
                     st.integers(0, 255))


def mutate(body: bytes, mutations) -> bytes:
    out = bytearray(body)
    for kind, where, value in mutations:
        i = where % (len(out) + 1)
        if kind == "insert":
            out.insert(i, value)
        elif kind == "special":
            out.insert(i, SPECIAL[value % len(SPECIAL)])
        elif i < len(out):
            if kind == "delete":
                del out[i]
            else:
                out[i] = value
    return bytes(out)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_bodies_match_the_reference_or_are_value_errors(seed, mutations):
    check(mutate(seed, mutations))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_match_the_reference_or_are_value_errors(body):
    check(body)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncation_is_a_value_error(seed):
    body = SEEDS[seed]
    check(body)  # the whole body parses
    for end in range(len(body.rstrip())):
        check(body[:end])
        with pytest.raises(ValueError):
            _core.parse_v2_json(body[:end])


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_single_byte_replacement_with_a_special_byte(seed):
    body = SEEDS[seed]
    for i in range(0, len(body), 3):
        for b in (b'"', b"]", b"}", b",", b"\\", b"\xff", b"0", b"-", b"e"):
            check(body[:i] + b + body[i + 1:])
