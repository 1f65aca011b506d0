"""The response cache (serving/cache.py): its key, LRU by bytes, copies nobody can write to, counts;
the model's `response_cache { enable: true }` and the server's `response_cache_bytes`."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cluster.config import FleetSettings
from serving.cache import ENTRY_OVERHEAD_BYTES, OUTPUT_OVERHEAD_BYTES, ResponseCache, cache_key
from serving.model_config import parse_config, spec_from_config
from serving.protocol import InferRequest, InputTensor, decode_request


def request(*inputs: tuple[str, str, np.ndarray], **parameters) -> InferRequest:
    return InferRequest([InputTensor(name, datatype, arr.shape, arr) for name, datatype, arr in inputs],
                        parameters=parameters)


def key(req: InferRequest, outputs=("probability",), model="fraud", version=1) -> bytes:
    return cache_key(model, version, req, list(outputs))


ROW = np.arange(30, dtype=np.float32).reshape(1, 30) / 7
FRAUD = request(("features", "FP32", ROW))


def answer(value: float, n: int = 1) -> list[tuple[str, str, np.ndarray]]:
    return [("probability", "FP32", np.full((1, n), value, np.float32))]


def size_of(n_floats: int, outputs: int = 1) -> int:
    """What an answer of `outputs` FP32 outputs of `n_floats` values in all costs in the cache."""
    return ENTRY_OVERHEAD_BYTES + outputs * OUTPUT_OVERHEAD_BYTES + 4 * n_floats


# -- the key ---------------------------------------------------------------------------------------


def test_the_key_is_16_bytes_and_the_same_for_the_same_request():
    again = request(("features", "FP32", ROW.copy()))
    assert len(key(FRAUD)) == 16 and key(FRAUD) == key(again)
    # the id is echoed per answer, not part of it
    with_id = request(("features", "FP32", ROW))
    with_id.id = "req-7"
    assert key(with_id) == key(FRAUD)


def test_shape_and_datatype_are_in_the_key_though_the_bytes_are_the_same():
    raw = np.arange(6, dtype=np.float32)
    assert key(request(("x", "FP32", raw.reshape(2, 3)))) != key(request(("x", "FP32", raw.reshape(3, 2))))
    assert key(request(("x", "FP32", raw.reshape(6)))) != key(request(("x", "FP32", raw.reshape(1, 6))))
    as_int = raw.view(np.int32)  # the very same 24 bytes
    assert key(request(("x", "FP32", raw))) != key(request(("x", "INT32", as_int)))


def test_model_version_and_input_names_are_in_the_key():
    assert key(FRAUD, model="fraud") != key(FRAUD, model="fraud2")
    assert key(FRAUD, version=1) != key(FRAUD, version=2)
    assert key(FRAUD) != key(request(("features2", "FP32", ROW)))
    # a name's characters cannot slide into the next field
    a = request(("ab", "FP32", ROW), c="1")
    b = request(("a", "FP32", ROW), bc="1")
    assert key(a) != key(b)


def test_the_order_of_inputs_does_not_matter_but_which_tensor_has_which_name_does():
    x, y = np.ones((1, 2), np.float32), np.zeros((1, 2), np.float32)
    assert key(request(("a", "FP32", x), ("b", "FP32", y))) == key(request(("b", "FP32", y), ("a", "FP32", x)))
    assert key(request(("a", "FP32", x), ("b", "FP32", y))) != key(request(("a", "FP32", y), ("b", "FP32", x)))


def test_the_requested_outputs_are_in_the_key_in_any_order():
    assert key(FRAUD, ["probability"]) != key(FRAUD, ["probability", "logits"])
    assert key(FRAUD, ["probability"]) != key(FRAUD, ["logits"])
    assert key(FRAUD, ["probability", "logits"]) == key(FRAUD, ["logits", "probability"])
    assert key(FRAUD, ["ab", "c"]) != key(FRAUD, ["a", "bc"])


def test_parameters_that_change_the_answer_are_in_the_key_transport_ones_are_not():
    plain = key(FRAUD)
    assert key(request(("features", "FP32", ROW), binary_data_output=True)) == plain
    assert key(request(("features", "FP32", ROW), timeout=5_000)) == plain
    assert key(request(("features", "FP32", ROW), priority=2)) == plain
    threshold = key(request(("features", "FP32", ROW), threshold=0.5))
    assert threshold != plain
    assert threshold != key(request(("features", "FP32", ROW), threshold=0.7))
    assert threshold != key(request(("features", "FP32", ROW), threshold="0.5"))  # a string is not a number
    assert threshold != key(request(("features", "FP32", ROW), cutoff=0.5))  # nor another parameter's value
    assert key(request(("features", "FP32", ROW), flag=True)) != key(request(("features", "FP32", ROW), flag=1))
    # the order parameters came in does not matter
    assert key(request(("features", "FP32", ROW), a=1, b=2)) == key(request(("features", "FP32", ROW), b=2, a=1))
    assert key(request(("features", "FP32", ROW), threshold=0.5, timeout=9)) == threshold


def test_bytes_elements_are_delimited():
    def words(*items):
        return request(("text", "BYTES", np.array(items, dtype=object)))

    assert key(words(b"ab", b"c")) != key(words(b"a", b"bc"))
    assert key(words(b"ab", b"")) != key(words(b"a", b"b"))
    assert key(words(b"ab", b"c")) == key(words(b"ab", b"c"))
    assert key(words(b"ab", b"c")) != key(request(("text", "UINT8", np.frombuffer(b"abc", np.uint8))))


def test_a_strided_or_big_endian_array_keys_as_its_contiguous_little_endian_copy():
    plain = np.arange(12, dtype=np.float32).reshape(3, 4)
    transposed = np.ascontiguousarray(plain.T).T  # the same values, Fortran order
    assert not transposed.flags.c_contiguous
    big = plain.astype(">f4")
    assert big.tobytes() != plain.tobytes()
    wide = np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2]  # every other column of a bigger array
    for other, same in ((transposed, plain), (big, plain), (wide, np.ascontiguousarray(wide))):
        assert key(request(("x", "FP32", other))) == key(request(("x", "FP32", same)))
    assert key(request(("x", "FP32", plain.T))) != key(request(("x", "FP32", plain)))  # other values


def test_the_json_and_binary_forms_of_a_request_share_a_key():
    """What a client sends decides nothing: a JSON request and its binary twin ask the same question."""
    json_body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1.5,2,3]}]}'
    header = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],'
              b'"parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}')
    binary_body = header + np.array([1.5, 2, 3], "<f4").tobytes()
    assert key(decode_request(json_body)) == key(decode_request(binary_body, len(header)))


# -- storing and evicting -------------------------------------------------------------------------


def test_lru_by_bytes_evicts_the_least_recently_used_and_counts_it():
    cache = ResponseCache(3 * size_of(1))
    keys = [key(request(("features", "FP32", ROW + i))) for i in range(5)]
    for i in range(3):
        assert cache.put(keys[i], answer(i), "fraud", 1)
    assert len(cache) == 3 and cache.bytes == 3 * size_of(1) and cache.evictions == 0
    assert cache.get(keys[0], "fraud", 1) is not None  # 0 is now the most recently used: 1 goes first
    cache.put(keys[3], answer(3), "fraud", 1)
    assert cache.get(keys[1], "fraud", 1) is None
    assert [cache.get(k, "fraud", 1)[0][2][0, 0] for k in (keys[0], keys[2], keys[3])] == [0, 2, 3]
    assert cache.evictions == 1 and cache.bytes == 3 * size_of(1)
    # a bigger answer makes room by bytes: two entries go for one of twice their size and more
    cache.put(keys[4], answer(4, n=(size_of(1) + 4) // 4), "fraud", 1)
    assert cache.evictions == 3 and len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.get(keys[0], "fraud", 1) is None and cache.get(keys[4], "fraud", 1) is not None


def test_an_answer_larger_than_the_whole_cache_is_not_stored_and_evicts_nothing():
    cache = ResponseCache(2 * size_of(1))
    small, huge = key(FRAUD), key(FRAUD, ["logits"])
    assert cache.put(small, answer(1.0), "fraud", 1)
    assert not cache.put(huge, answer(2.0, n=1000), "fraud", 1)
    assert cache.oversize == 1 and cache.evictions == 0 and len(cache) == 1
    assert cache.get(huge, "fraud", 1) is None and cache.get(small, "fraud", 1) is not None


def test_putting_a_stored_key_again_keeps_the_first_answer_and_its_bytes():
    cache = ResponseCache(10 * size_of(1))
    k = key(FRAUD)
    cache.put(k, answer(1.0), "fraud", 1)
    cache.put(k, answer(1.0), "fraud", 1)  # two concurrent misses of one request both computed it
    assert len(cache) == 1 and cache.bytes == size_of(1)


def test_sizes_count_the_data_of_each_output_and_bytes_elements():
    cache = ResponseCache(1 << 20)
    cache.put(b"k" * 16, [("a", "FP32", np.zeros((2, 5), np.float32)), ("b", "INT64", np.zeros(3, np.int64))],
              "m", 1)
    assert cache.bytes == ENTRY_OVERHEAD_BYTES + 2 * OUTPUT_OVERHEAD_BYTES + 40 + 24
    text = np.array([b"x" * 1000, b"y"], dtype=object)
    cache.put(b"t" * 16, [("s", "BYTES", text)], "m", 1)
    assert cache.bytes - (ENTRY_OVERHEAD_BYTES + 2 * OUTPUT_OVERHEAD_BYTES + 64) > 1000 + ENTRY_OVERHEAD_BYTES


def test_zero_bytes_is_no_cache():
    with pytest.raises(ValueError, match="response_cache_bytes"):
        ResponseCache(0)


# -- copies nobody can write to ---------------------------------------------------------------------


def test_the_stored_answer_is_a_copy_and_what_get_returns_cannot_be_written():
    cache = ResponseCache(1 << 20)
    source = np.array([[0.25, 0.75]], np.float32)
    text = np.array([b"yes", b"no"], dtype=object)
    cache.put(key(FRAUD), [("probability", "FP32", source), ("label", "BYTES", text)], "fraud", 1)
    source[0, 0] = 9.0  # the caller reuses its batch buffer
    text[0] = b"changed"
    (name, datatype, got), (_, _, words) = cache.get(key(FRAUD), "fraud", 1)
    assert (name, datatype) == ("probability", "FP32") and got.tolist() == [[0.25, 0.75]]
    assert words.tolist() == [b"yes", b"no"]
    for arr in (got, words):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1
        with pytest.raises(ValueError):
            arr.setflags(write=True)
    with pytest.raises(ValueError):
        got.base.setflags(write=True)  # held in a bytes object: no way back to writable
    assert cache.get(key(FRAUD), "fraud", 1)[0][2].tolist() == [[0.25, 0.75]]


def test_a_strided_or_big_endian_answer_comes_back_with_its_values():
    cache = ResponseCache(1 << 20)
    values = np.arange(12, dtype=">f4").reshape(3, 4).T
    cache.put(b"k" * 16, [("y", "FP32", values)], "m", 1)
    (_, _, got), = cache.get(b"k" * 16, "m", 1)
    assert got.shape == (4, 3) and np.array_equal(got, values)


# -- invalidation and counts ---------------------------------------------------------------------------


def test_invalidate_drops_a_version_or_a_whole_model_and_frees_its_bytes():
    cache = ResponseCache(1 << 20)
    for model, version in (("fraud", 1), ("fraud", 2), ("digits", 1)):
        cache.put(key(FRAUD, model=model, version=version), answer(version), model, version)
    assert cache.invalidate("fraud", 1) == 1
    assert cache.get(key(FRAUD, model="fraud", version=1), "fraud", 1) is None
    assert cache.get(key(FRAUD, model="fraud", version=2), "fraud", 2) is not None
    assert len(cache) == 2 and cache.bytes == 2 * size_of(1)
    assert cache.invalidate("fraud") == 1 and cache.invalidate("fraud") == 0
    assert len(cache) == 1 and cache.get(key(FRAUD, model="digits"), "digits", 1) is not None
    assert cache.evictions == 0  # dropped on purpose, not to make room
    cache.put(key(FRAUD, model="fraud", version=3), answer(3), "fraud", 3)  # the index still works afterwards
    assert cache.invalidate("fraud", 3) == 1 and len(cache) == 1


def test_take_counts_gives_deltas_per_model_version_and_the_gauges_now():
    cache = ResponseCache(2 * size_of(1))
    k1, k2, k3 = (key(FRAUD, version=v) for v in (1, 2, 3))
    assert cache.get(k1, "fraud", 1) is None
    cache.put(k1, answer(1), "fraud", 1)
    cache.get(k1, "fraud", 1)
    cache.get(k1, "fraud", 1)
    cache.get(k2, "fraud", 2)
    counts = cache.take_counts()
    hits, misses, hit_ns, miss_ns = counts["models"][("fraud", "1")]
    assert (hits, misses) == (2, 1) and hit_ns > 0 and miss_ns > 0
    assert counts["models"][("fraud", "2")][:2] == (0, 1)
    assert (counts["entries"], counts["bytes"], counts["capacity_bytes"]) == (1, size_of(1), 2 * size_of(1))
    assert (counts["evictions"], counts["oversize"]) == (0, 0)
    cache.put(k2, answer(2), "fraud", 2)
    cache.put(k3, answer(3), "fraud", 3)  # evicts k1
    cache.put(key(FRAUD, version=4), answer(4, n=10_000), "fraud", 4)  # too big
    counts = cache.take_counts()
    assert (counts["evictions"], counts["oversize"], counts["entries"]) == (1, 1, 2)
    assert counts["models"][("fraud", "2")][:2] == (0, 0)  # only the put's time, counted as the miss's
    again = cache.take_counts()
    assert again["models"] == {} and (again["evictions"], again["oversize"], again["entries"]) == (0, 0, 2)


def test_threads_putting_and_getting_at_once_keep_the_books_straight():
    cache = ResponseCache(20 * size_of(1))
    keys = [i.to_bytes(16, "little") for i in range(200)]

    def work(offset: int) -> None:
        for i in range(2000):
            k = keys[(i * 7 + offset) % len(keys)]
            if cache.get(k, "m", 1) is None:
                cache.put(k, answer(float(i)), "m", 1)
            if i % 500 == 0:
                cache.invalidate("m", 1)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.bytes == len(cache) * size_of(1) <= cache.max_bytes
    counts = cache.take_counts()
    hits, misses, _, _ = counts["models"][("m", "1")]
    assert hits + misses == 4 * 2000


# -- config and settings --------------------------------------------------------------------------------


CONFIG = """
name: "fraud"
platform: "pytorch_libtorch"
max_batch_size: 64
input [ { name: "features" data_type: TYPE_FP32 dims: [ 30 ] } ]
output [ { name: "probability" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def test_a_model_enables_the_cache_in_its_config_pbtxt():
    assert not spec_from_config(parse_config(CONFIG)).response_cache
    assert spec_from_config(parse_config(CONFIG + "response_cache { enable: true }\n")).response_cache
    assert not spec_from_config(parse_config(CONFIG + "response_cache { enable: false }\n")).response_cache


def test_response_cache_bytes_is_off_by_default_reaches_the_replicas_and_refuses_a_negative(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "none.yaml"))
    assert FleetSettings().serving_options().response_cache_bytes == 0
    monkeypatch.setenv("FLEET_RESPONSE_CACHE_BYTES", str(64 << 20))
    assert FleetSettings().serving_options().response_cache_bytes == 64 << 20
    with pytest.raises(ValueError, match="response_cache_bytes"):
        FleetSettings(response_cache_bytes=-1)
