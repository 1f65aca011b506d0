"""Request limits (serving/limits.py) and the server's default queue timeout, without Ray or sockets.

Each limit is refused with a 400 (413 for the body) whose message gives the limit and
the setting that raises it, before the model sees anything. The FLEET_PURE_PYTHON rerun of
`make test` runs these over the NumPy reference parser too; the parsers' own refusal of
100,000 nested brackets is checked on both here.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time

import numpy as np
import orjson
import pytest

from cluster.config import FleetSettings
from native import _reference
from serving.errors import DeadlineExceeded, FleetError, InvalidInput, PayloadTooLarge
from serving.http_api import decode_body, read_body
from serving.limits import RequestLimits, check_json_depth, json_depth
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.options import ServingOptions
from serving.protocol import decode_request
from serving.service import InferenceService

LIMITS = RequestLimits(max_tensor_elements=1000, max_string_bytes=64, max_json_depth=8, max_batch_rows=4)


def _doc(**tensor) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0], **tensor}]}


def _refused(body: bytes, *phrases: str, header_length: int | None = None, limits=LIMITS) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_request(body, header_length, limits)
    assert info.value.status == 400
    for phrase in phrases:
        assert phrase in info.value.message
    return info.value.message


# -- JSON nesting depth -----------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [0, 1, 2, 7, 31, 200])
def test_json_depth_matches_the_parsed_structure(depth):
    text = orjson.dumps({"a": _nested(depth), "s": "[[[{{ \\\" ]]", "t": ["\\", "]"]})
    assert json_depth(text) == max(depth + 1, 2)  # "t" is a list inside the root


def test_brackets_and_escaped_quotes_inside_strings_do_not_count():
    assert json_depth(b'{"a": "[[[[[[[[[[", "b": "\\"[[[[", "c": ["\\\\", "]]]]]"]}') == 2


@pytest.mark.parametrize("where", ["root", "parameters", "data", "object"])
def test_100000_nested_brackets_are_a_400_naming_the_setting(where):
    deep = b"[" * 100_000 + b"]" * 100_000
    body = {
        "root": deep,
        "parameters": b'{"parameters": {"p": ' + deep + b'}, "inputs": []}',
        "data": b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + deep + b"}]}",
        "object": b'{"x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b', "inputs": []}',
    }[where]
    start = time.perf_counter()
    _refused(body, "nesting depth of 100000" if where == "root" else "nesting depth of", "over the limit of 8",
             "max_json_depth", "FLEET_MAX_JSON_DEPTH")
    assert time.perf_counter() - start < 0.5


def test_without_a_depth_limit_both_parsers_refuse_100000_brackets_without_crashing():
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 100_000 + b"1" + \
        b"]" * 100_000 + b"}]}"
    _refused(body, "malformed JSON", limits=RequestLimits(0, 0, 0, 0))
    import native

    for parse in {native.parse_v2_json, _reference.parse_v2_json}:
        with pytest.raises(ValueError, match="depth"):
            parse(body)


def test_the_depth_limit_is_inclusive_and_counts_parameters():
    at = {**_doc(), "parameters": {"p": _nested(6)}}  # the root, "parameters", then 6 more
    assert json_depth(orjson.dumps(at)) == 8
    decode_request(orjson.dumps(at), None, LIMITS)
    over = {**_doc(), "parameters": {"p": [_nested(6)]}}
    _refused(orjson.dumps(over), "nesting depth of 9")
    check_json_depth(orjson.dumps(over), 0)  # 0: no limit


# -- element count, from the declared shape -----------------------------------------


@pytest.mark.parametrize("shape", [[1001], [1, 1001], [10, 10, 11], [2**40], [2**20, 2**20]])
def test_a_declared_shape_over_max_tensor_elements_is_refused_before_its_data_is_read(shape):
    start = time.perf_counter()
    _refused(orjson.dumps(_doc(shape=shape, data=[1.0])), "over the limit of 1000 elements",
             "max_tensor_elements", "FLEET_MAX_TENSOR_ELEMENTS")
    assert time.perf_counter() - start < 0.1  # nothing of 2**40 elements was made


@pytest.mark.parametrize("parser", ["live", "reference"])
def test_neither_parser_allocates_a_declared_shape_the_body_cannot_hold(parser):
    import tracemalloc

    import native

    parse = native.parse_v2_json if parser == "live" else _reference.parse_v2_json
    body = orjson.dumps(_doc(shape=[1 << 26, 30], data=[1.0, 2.0]))  # 8 GB of FP32 declared, 2 values sent
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="needs 2013265920 values"):
            parse(body)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_bytes < 1 << 20


def test_a_binary_shape_over_max_tensor_elements_is_refused_before_its_data_is_viewed():
    for datatype in ("FP32", "BYTES"):
        header = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [2**40],
                                           "parameters": {"binary_data_size": 8}}]})
        _refused(header + b"\0" * 8, "1099511627776 elements", "max_tensor_elements", header_length=len(header))


def test_the_element_limit_is_inclusive():
    request = decode_request(orjson.dumps(_doc(shape=[1000], data=[0.5] * 1000)), None, LIMITS)
    assert request.inputs[0].data.shape == (1000,)


# -- strings ------------------------------------------------------------------------


def test_a_json_bytes_element_over_max_string_bytes_is_refused():
    body = orjson.dumps(_doc(datatype="BYTES", shape=[2], data=["ok", "x" * 65]))
    _refused(body, "BYTES element of 65 bytes", "over the limit of 64 bytes", "max_string_bytes",
             "FLEET_MAX_STRING_BYTES")
    decode_request(orjson.dumps(_doc(datatype="BYTES", shape=[2], data=["ok", "x" * 64])), None, LIMITS)


def test_string_lengths_count_utf8_bytes():
    _refused(orjson.dumps(_doc(datatype="BYTES", shape=[1], data=["é" * 33])), "66 bytes")  # 2 bytes each
    decode_request(orjson.dumps(_doc(datatype="BYTES", shape=[1], data=["é" * 32])), None, LIMITS)


def test_a_binary_bytes_element_over_max_string_bytes_is_refused_before_it_is_copied():
    blob = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 65) + b"y" * 65
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2],
                                       "parameters": {"binary_data_size": len(blob)}}]})
    _refused(header + blob, "BYTES element 1 of 65 bytes", "max_string_bytes", header_length=len(header))


@pytest.mark.parametrize("what,doc,phrase", [
    ("id", {**_doc(), "id": "i" * 65}, "'id' of 65 bytes"),
    ("input name", _doc(name="n" * 65), "inputs[0] name of 65 bytes"),
    ("output name", {**_doc(), "outputs": [{"name": "o" * 65}]}, "outputs[0] name of 65 bytes"),
    ("request parameter", {**_doc(), "parameters": {"p": "v" * 65}}, "request parameter['p'] of 65 bytes"),
    ("parameter key", {**_doc(), "parameters": {"k" * 65: 1}}, "request parameter key of 65 bytes"),
    ("nested parameter", {**_doc(), "parameters": {"p": {"q": ["v" * 65]}}}, "of 65 bytes"),
    ("input parameter", _doc(parameters={"p": "v" * 65}), "input 'x' parameter['p'] of 65 bytes"),
    ("output parameter", {**_doc(), "outputs": [{"name": "y", "parameters": {"p": "v" * 65}}]}, "of 65 bytes"),
])
def test_every_other_string_is_held_to_max_string_bytes(what, doc, phrase):
    _refused(orjson.dumps(doc), phrase, "over the limit of 64 bytes", "max_string_bytes")


@pytest.mark.parametrize("value, ok", [
    ("é" * 32, True), ("é" * 33, False),  # 2 bytes each: 64 and 66
    ("😀" * 16, True), ("😀" * 16 + "a", False),  # 4 bytes each: 64 and 65
    ("a" * 17, True), ("a" * 64, True), ("a" * 65, False),  # past the quick test's 16 characters, counted
])
def test_parameter_strings_are_counted_in_utf8_bytes_past_the_quick_test(value, ok):
    for doc in ({**_doc(), "parameters": {"p": value}}, {**_doc(), "parameters": {value: 1}}, _doc(parameters={"p": value}),
                {**_doc(), "outputs": [{"name": "y", "parameters": {"p": value}}]}):
        if ok:
            decode_request(orjson.dumps(doc), None, LIMITS)
        else:
            _refused(orjson.dumps(doc), "bytes", "over the limit of 64 bytes", "max_string_bytes")


def test_no_limits_unless_given():
    doc = {**_doc(shape=[1, 2000], data=[0.0] * 2000), "id": "i" * 1000, "parameters": {"p": _nested(20)}}
    assert decode_request(orjson.dumps(doc)).id == "i" * 1000


# -- the body ---------------------------------------------------------------------------


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def test_a_body_over_max_request_bytes_is_a_413_naming_the_setting():
    for declared, parts in (("2048", [b"x"]), (None, [b"x" * 1000, b"x" * 1000])):
        with pytest.raises(PayloadTooLarge) as info:
            asyncio.run(read_body(declared, None, _chunks(*parts), 1024))
        assert info.value.status == 413
        assert "over the limit of 1024 bytes" in info.value.message and "max_request_bytes" in info.value.message
    import gzip

    with pytest.raises(PayloadTooLarge, match="decompressed request body is over the limit of 1024 bytes"):
        decode_body(gzip.compress(b"{" * 5000), "gzip", 1024)


# -- through the service: refused before the model sees anything, settings plumbed --------------


class _Worker:
    """A model's worker whose batches can be held open; counts what it computed."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def infer(self, version: int, inputs: dict) -> dict:
        self.batches.append(len(inputs["x"]))
        await self.gate.wait()
        return {"y": inputs["x"] * 2}

    async def status(self) -> dict:
        return {"versions": [1]}


def _service(options: ServingOptions, **config) -> tuple[InferenceService, _Worker]:
    worker = _Worker()
    cfg = make_config("m", [TensorSpec("x", "FP32", (2,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8,
                      parameters={"fleet.max_inflight_batches": "1"}, **config)
    return InferenceService({"m": (spec_from_config(cfg), cfg, worker)}, options), worker


def _rows(n: int, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [n, 2], "datatype": "FP32", "data": [0.5] * 2 * n}],
                       **extra}).encode()


def test_settings_reach_the_service_and_every_limit_refuses_before_the_model_computes(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_BATCH_ROWS", "4")
    monkeypatch.setenv("FLEET_MAX_STRING_BYTES", "16")
    monkeypatch.setenv("FLEET_MAX_JSON_DEPTH", "6")
    monkeypatch.setenv("FLEET_MAX_TENSOR_ELEMENTS", "100")
    monkeypatch.setenv("FLEET_DEFAULT_TIMEOUT_MS", "250")
    options = FleetSettings(repository="/nonexistent").serving_options()
    assert (options.max_batch_rows, options.max_string_bytes, options.max_json_depth, options.max_tensor_elements,
            options.default_timeout_ms) == (4, 16, 6, 100, 250.0)

    async def run():
        service, worker = _service(options)
        await service.refresh()
        cases = [
            (_rows(5), "a batch of 5 rows is over the limit of 4 rows", "max_batch_rows"),
            (_rows(1, id="x" * 17), "'id' of 17 bytes is over the limit of 16 bytes", "max_string_bytes"),
            (_rows(1, parameters={"p": [[[[[1]]]]]}), "nesting depth of 7 is over the limit of 6", "max_json_depth"),
            (json.dumps({"inputs": [{"name": "x", "shape": [51, 2], "datatype": "FP32", "data": [1]}]}).encode(),
             "102 elements", "max_tensor_elements"),
        ]
        for body, phrase, setting in cases:
            with pytest.raises(FleetError) as info:
                await service.infer("m", None, body, None)
            assert info.value.status == 400 and phrase in info.value.message and setting in info.value.message
        assert worker.batches == []  # none of them reached the model
        payload, _, _ = await service.infer("m", None, _rows(4), None)  # at the limits: answered
        assert json.loads(payload)["outputs"][0]["data"] == [1.0] * 8
        await service.close()

    asyncio.run(run())


def test_the_batch_row_cap_leaves_the_models_own_message_below_it():
    async def run():
        service, _ = _service(ServingOptions(repository="/nonexistent", max_batch_rows=100))
        await service.refresh()
        with pytest.raises(InvalidInput, match=r"outside 1\.\.8 \(max_batch_size\)"):
            await service.infer("m", None, _rows(9), None)
        await service.close()

    asyncio.run(run())


# -- the server's default queue timeout -------------------------------------------------------


async def _queued_behind_a_held_batch(service: InferenceService, worker: _Worker, body: bytes) -> float:
    """Seconds until `body`, queued behind a batch the worker holds, is answered DeadlineExceeded."""
    worker.gate.clear()
    first = asyncio.create_task(service.infer("m", None, _rows(1), None))
    while not worker.batches:
        await asyncio.sleep(0.001)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await asyncio.wait_for(service.infer("m", None, body, None), 5.0)
    waited = time.monotonic() - start
    assert info.value.status == 504
    worker.gate.set()
    await first
    assert worker.batches == [1]  # the late one was never computed
    return waited


def test_the_server_default_timeout_applies_to_models_without_one_and_a_request_may_shorten_it():
    async def run():
        service, worker = _service(ServingOptions(repository="/nonexistent", default_timeout_ms=150))
        await service.refresh()
        assert service._batcher(service.models["m"], 1).config.default_timeout_us == 150_000
        waited = await _queued_behind_a_held_batch(service, worker, _rows(1))
        assert 0.12 <= waited < 1.0
        worker.batches.clear()
        waited = await _queued_behind_a_held_batch(service, worker, _rows(1, parameters={"timeout": 20_000}))
        assert waited < 0.12  # 20 ms of its own, shorter than the server's 150
        worker.batches.clear()
        waited = await _queued_behind_a_held_batch(service, worker, _rows(1, parameters={"timeout": 5_000_000}))
        assert 0.12 <= waited < 1.0  # never longer than the default
        await service.close()

    asyncio.run(run())


def test_a_models_own_default_timeout_wins_over_the_servers():
    async def run():
        service, _ = _service(ServingOptions(repository="/nonexistent", default_timeout_ms=150),
                              default_timeout_us=2_000_000)
        await service.refresh()
        assert service._batcher(service.models["m"], 1).config.default_timeout_us == 2_000_000
        await service.close()

    asyncio.run(run())


def test_without_a_default_a_queued_request_waits_for_its_turn():
    async def run():
        service, worker = _service(ServingOptions(repository="/nonexistent"))
        await service.refresh()
        worker.gate.clear()
        first = asyncio.create_task(service.infer("m", None, _rows(1), None))
        while not worker.batches:
            await asyncio.sleep(0.001)
        second = asyncio.create_task(service.infer("m", None, _rows(1), None))
        await asyncio.sleep(0.3)
        assert not second.done()
        worker.gate.set()
        await asyncio.gather(first, second)
        assert worker.batches == [1, 1]
        await service.close()

    asyncio.run(run())


def test_json_depth_is_vectorised():
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [20000, 30],
                                     "data": np.zeros((20000, 30)).tolist()}]})
    start = time.perf_counter()
    assert json_depth(body) == 5
    assert time.perf_counter() - start < 0.2


def test_json_depth_is_exact_across_its_chunks():
    from serving.limits import _CHUNK

    assert json_depth(b"[" * (_CHUNK + 5) + b"]" * (_CHUNK + 5)) == _CHUNK + 5
    assert json_depth(b'["' + b"[" * (_CHUNK + 3) + b'", [1]]') == 2  # a string across a chunk's end
