"""The response cache: answers of deterministic models kept by request, with Triton's semantics.

A model opts in with `response_cache { enable: true }` in its config.pbtxt; the server gives the cache
its size (`response_cache_bytes`, 0: no cache at all, whatever the models say, as in Triton). One
`ResponseCache` per ingress replica, shared by its models, evicts the least recently used answers
to stay within its bytes.

How the service uses it (only successful answers of the model itself are put: never an error, never
a fallback's answer, never a request of a stateful model):

    key = cache_key(model, version, request, output_names)   # after decode + validate + routing
    outputs = cache.get(key, model, version)                  # a hit: answer these
    ...                                                       # a miss: batch, compute
    cache.put(key, outputs, model, version)                   # the answer the client got
    cache.invalidate(model, version)                          # a version stopped being served

Counts (hits, misses, lookup times per model version; evictions, entries, bytes) are kept here and
taken as deltas (`take_counts`) about once a second, as the rest of a replica's statistics.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
import time
from collections import OrderedDict
from typing import Iterable

import numpy as np

from serving.protocol import InferRequest, serialize_bytes_tensor

__all__ = ["ENTRY_OVERHEAD_BYTES", "OUTPUT_OVERHEAD_BYTES", "TRANSPORT_PARAMETERS", "ResponseCache", "cache_key"]

# What an entry costs beyond its arrays' data, measured with tracemalloc (CPython 3.11, NumPy 2.4: 646
# bytes for one FP32 [1, 1] output, 1,035 for two outputs of 64 data bytes) and rounded up: the key (a
# 16-byte bytes object), its OrderedDict node, the entry tuple, its slot in the version index ...
ENTRY_OVERHEAD_BYTES = 320
# ... and per output: the ndarray header over its data, the bytes object holding it, the name tuple.
OUTPUT_OVERHEAD_BYTES = 336

# Request parameters that change how an answer travels or when it is computed, never what it is: they
# are left out of the key, so requests differing only in them share an entry.
#   binary_data_output  the encoding of the response (JSON or binary tensors); outputs are encoded per request
#   timeout             the queue deadline (µs): a request that missed it got an error, which is never put
#   priority            the queue order
# Everything else is in the key, unknown parameters included: a false miss costs one computation, a
# false hit serves a wrong answer. `sequence_id`, `sequence_start` and `sequence_end` stay in the key
# although a stateful model's answer depends on more than its request: such a model must not enable
# the cache; keeping them keeps two sequences' requests apart at least.
TRANSPORT_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority"})

_KEY_PERSON = b"fleet.cache.v1"  # blake2b personalisation: these digests never equal another use's
_LITTLE = sys.byteorder == "little"


def _le_contiguous(arr: np.ndarray) -> np.ndarray:
    """The array itself when it is C-contiguous little-endian (or byte-order free), else such a copy."""
    order = arr.dtype.byteorder
    if arr.flags.c_contiguous and (order == "<" or order == "|" or (order == "=" and _LITTLE)):
        return arr
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


def _pick_hash():
    """BLAKE2b-128, or SHA-256 cut to 16 bytes where it is faster: on CPUs with SHA instructions (x86 SHA-NI,
    ARMv8) it hashes a digits image in half BLAKE2b's time, elsewhere in twice. Both resist collisions,
    and a key only has to agree with keys of the same process: timed once, at import (~1 ms)."""
    sample = bytes(4096)

    def blake2b(data):
        return hashlib.blake2b(data, digest_size=16, person=_KEY_PERSON)

    best, best_ns = blake2b, None
    for make in (blake2b, hashlib.sha256):
        took = []
        for _ in range(3):
            start = time.perf_counter_ns()
            for _ in range(32):
                make(sample).digest()
            took.append(time.perf_counter_ns() - start)
        if best_ns is None or min(took) < best_ns:
            best, best_ns = make, min(took)
    return best


_new_hash = _pick_hash()


def _input_name(tensor) -> str:
    return tensor.name


_DTYPE_TAGS: dict[np.dtype, str] = {}


def _dtype_tag(dtype: np.dtype) -> str:
    tag = _DTYPE_TAGS.get(dtype)
    if tag is None:  # a handful of dtypes ever: dtype.str builds a new string each time
        tag = _DTYPE_TAGS[dtype] = dtype.str
    return tag


def cache_key(model: str, version: int, request: InferRequest, output_names: Iterable[str]) -> bytes:
    """The 16-byte digest (BLAKE2b-128 or SHA-256, see `_pick_hash`) naming the answer of `model` `version`
    to `request`.

    Over the model, the version, each input (in name order: the order of a request's inputs does not
    change its answer) with its name, datatype, NumPy dtype, shape and data, the output names the answer
    holds (sorted; pass the resolved names, so that "no outputs asked" and "all of them" meet), and the
    request parameters but `TRANSPORT_PARAMETERS`. Unlike Triton's key, shapes and datatypes are in it:
    a [2, 3] and a [3, 2] tensor of the same bytes are different requests. Every field is
    length-delimited, so different requests never make the same stream before hashing. Data is hashed
    as C-contiguous little-endian, so a strided or big-endian array keys as its plain copy; a BYTES
    element is hashed length-prefixed (b"ab", b"c" is not b"a", b"bc"). The request id is not in the
    key: the answer echoes each request's own id. Parameters are the JSON / protobuf values the decoders
    give (str, int, float, bool, None, lists, dicts), hashed by their repr, which tells all of them
    apart (a nested dict in another key order only misses).
    """
    inputs = request.inputs
    if len(inputs) > 1:
        inputs = sorted(inputs, key=_input_name)
    # Numbers packed: the version; per input its rank, dims and data bytes; the outputs asked; the length of
    # each string. Then the strings (model; per input name, datatype, dtype; outputs; parameters) end to
    # end, then the data: every field's extent follows from what came before it.
    strings, numbers, datas = [model], [version, len(inputs)], []
    for tensor in inputs:
        data = tensor.data
        if data.dtype.kind == "O":
            blob = serialize_bytes_tensor(data)  # each element after its 4-byte length
            size, tag = len(blob), "|O"
        else:
            blob = _le_contiguous(data)
            size, tag = blob.nbytes, _dtype_tag(blob.dtype)  # "<f4": of the little-endian form
        shape = data.shape
        strings += (tensor.name, tensor.datatype, tag)
        numbers.append(len(shape))
        numbers.extend(shape)
        numbers.append(size)
        datas.append(blob)
    names = sorted(output_names)
    strings += names
    numbers.append(len(names))
    params = request.parameters
    kept = sorted(item for item in params.items() if item[0] not in TRANSPORT_PARAMETERS) if params else None
    strings.append(repr(kept) if kept else "")  # repr tells str, int, float, bool, None, lists, dicts apart
    numbers.extend(map(len, strings))
    text = "".join(strings).encode("utf-8", "surrogatepass")
    h = _new_hash(struct.pack(f"<{len(numbers)}q", *numbers))
    h.update(text)
    for blob in datas:  # no copy of a large tensor into one buffer
        h.update(blob)
    return h.digest()[:16]


def _frozen(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """A copy of `arr` nobody can write to, and the bytes it holds.

    Numbers are copied into a bytes object and viewed from it: no flag can make that writable. BYTES
    (object arrays) are copied and flagged read-only, and a view of the copy is what is kept and handed
    out, so that `setflags(write=True)` on it fails too; their elements are immutable bytes or str.
    """
    if arr.dtype.kind == "O":
        owned = np.array(arr, dtype=object, order="C", copy=True)
        owned.setflags(write=False)
        size = owned.nbytes + sum(sys.getsizeof(x) for x in owned.ravel())
        return owned.view(), size
    data = np.ascontiguousarray(arr).tobytes()
    return np.frombuffer(data, dtype=arr.dtype).reshape(arr.shape), len(data)


class ResponseCache:
    """LRU by bytes over answers: {key: (model, version, outputs, size)}.

    An entry's size is its arrays' data (a BYTES tensor: its pointers and bytes objects) plus
    `ENTRY_OVERHEAD_BYTES` and `OUTPUT_OVERHEAD_BYTES` per output. An answer bigger than `max_bytes` is
    never stored (counted as oversize). Used from one event loop; a lock makes `get`, `put`, `invalidate`
    and `take_counts` safe from a worker thread as well (uncontended it costs ~0.3 µs of a ~1 µs get on a
    busy 2-core test box, within that box's noise).
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"a response cache needs response_cache_bytes > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, tuple] = OrderedDict()
        self._by_version: dict[tuple[str, int], dict[bytes, None]] = {}  # what invalidate() drops
        self._lock = threading.Lock()
        self._bytes = 0
        self._counts: dict[tuple[str, int], list[int]] = {}  # [hits, misses, hit_ns, miss_ns] since take_counts
        self.evictions = 0  # since start
        self.oversize = 0
        self._taken_evictions = 0
        self._taken_oversize = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes held now (data plus overheads)."""
        return self._bytes

    def _count(self, model: str, version: int) -> list[int]:
        counts = self._counts.get((model, version))
        if counts is None:
            counts = self._counts[(model, version)] = [0, 0, 0, 0]
        return counts

    def get(self, key: bytes, model: str, version: int) -> tuple[tuple[str, str, np.ndarray], ...] | None:
        """The stored answer ((name, datatype, read-only array), ...), or None; counted as a hit or a miss
        of `model` `version` with the time the lookup took (Triton's cache_hit / cache_miss durations)."""
        start = time.perf_counter_ns()
        with self._lock:
            entry = self._entries.get(key)
            counts = self._count(model, version)
            if entry is None:
                counts[1] += 1
                counts[3] += time.perf_counter_ns() - start
                return None
            self._entries.move_to_end(key)
            counts[0] += 1
            counts[2] += time.perf_counter_ns() - start
            return entry[2]

    def put(self, key: bytes, outputs: Iterable[tuple[str, str, np.ndarray]], model: str, version: int) -> bool:
        """Store a successful answer of `model` `version` under `key` (copies, read-only); evict the least
        recently used entries to make room. False when it was not stored: larger than the whole cache.
        The time it takes adds to the miss duration of `model` `version`, as Triton counts insertion."""
        start = time.perf_counter_ns()
        frozen, size = [], ENTRY_OVERHEAD_BYTES
        for name, datatype, arr in outputs:
            copy, nbytes = _frozen(np.asarray(arr))
            frozen.append((name, datatype, copy))
            size += nbytes + OUTPUT_OVERHEAD_BYTES
        stored = False
        with self._lock:
            counts = self._count(model, version)
            if size > self.max_bytes:
                self.oversize += 1
            elif key in self._entries:  # two misses of one request computed it twice: keep the first
                self._entries.move_to_end(key)
            else:
                self._entries[key] = (model, version, tuple(frozen), size)
                self._by_version.setdefault((model, version), {})[key] = None
                self._bytes += size
                while self._bytes > self.max_bytes:
                    self._drop(next(iter(self._entries)))
                    self.evictions += 1
                stored = True
            counts[3] += time.perf_counter_ns() - start
        return stored

    def _drop(self, key: bytes) -> None:
        model, version, _, size = self._entries.pop(key)
        self._bytes -= size
        keys = self._by_version[(model, version)]
        del keys[key]
        if not keys:
            del self._by_version[(model, version)]

    def invalidate(self, model: str, version: int | None = None) -> int:
        """Drop every answer of `model` (of one `version` only if given); the number dropped.

        The service calls it when a version stops being served: its answers can never be asked for
        again (the version is in the key), so they would only hold memory. Not counted as evictions.
        """
        with self._lock:
            versions = [k for k in self._by_version if k[0] == model and (version is None or k[1] == version)]
            keys = [key for k in versions for key in self._by_version[k]]
            for key in keys:
                self._drop(key)
            return len(keys)

    def take_counts(self) -> dict:
        """What happened since the last call, and the cache now:

            {"models": {(model, "version"): (hits, misses, hit_ns, miss_ns)},
             "evictions": n, "oversize": n,                      # deltas
             "entries": n, "bytes": n, "capacity_bytes": n}     # now

        Versions are strings, as `serving.metrics.StatsRecorder` keys them.
        """
        with self._lock:
            counts, self._counts = self._counts, {}
            evictions, self._taken_evictions = self.evictions - self._taken_evictions, self.evictions
            oversize, self._taken_oversize = self.oversize - self._taken_oversize, self.oversize
            entries, held = len(self._entries), self._bytes
        return {
            "models": {(model, str(version)): tuple(c) for (model, version), c in counts.items()},
            "evictions": evictions,
            "oversize": oversize,
            "entries": entries,
            "bytes": held,
            "capacity_bytes": self.max_bytes,
        }
