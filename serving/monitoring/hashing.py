"""Row hashes of the prediction log: `input_hash` and `prediction_hash`, and hashed (redacted) features.

`row_hashes(a)` is FNV-1a (64 bit) over each row's bytes read as little-endian 32-bit words
(the row's bytes zero-padded to a multiple of 4), one vectorised NumPy pass per word: a row
of 30 float32 features costs 30 multiply-xor steps over the whole batch. It identifies a row
(equal bytes, equal hash; a different row collides with probability about 2^-64 per pair),
so an auditor can find the log entry of a given input or answer:

    from serving.monitoring.hashing import row_hashes
    row_hashes(np.asarray([[...30 features...]], np.float32))[0]  ==  the logged input_hash

It is not a cryptographic hash: it does not hide what was hashed from someone who can guess it.
Images of any size are hashed one by one over their bytes (`bytes_hash`, the same function).
"""

from __future__ import annotations

import numpy as np

__all__ = ["FNV_OFFSET", "FNV_PRIME", "row_hashes", "bytes_hash", "value_hashes"]

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_PRIME = np.uint64(FNV_PRIME)


def _words(a: np.ndarray) -> np.ndarray:
    """Each row's bytes as uint32 words [n, w], zero-padded to a multiple of 4 bytes."""
    a = np.ascontiguousarray(a)
    n = a.shape[0] if a.ndim else 1
    raw = a.reshape(n, -1).view(np.uint8).reshape(n, -1) if a.size else np.zeros((n, 0), np.uint8)
    pad = (-raw.shape[1]) % 4
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], axis=1)
    return raw.view("<u4")


def row_hashes(a: np.ndarray, salt: int = 0) -> np.ndarray:
    """uint64 [n]: the FNV-1a-64 hash of each row of `a` [n, ...] (its C-order bytes, by 32-bit words).

    `salt` (default 0: the documented hash) is xor-ed into the offset basis.
    """
    columns = np.ascontiguousarray(_words(a).T)  # one contiguous row per word position: fast column passes
    h = np.full(columns.shape[1], FNV_OFFSET ^ (salt & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in columns:
            h ^= column
            h *= _PRIME
    return h


def bytes_hash(data: bytes) -> int:
    """The same hash of one byte string (an image of any size)."""
    return int(row_hashes(np.frombuffer(data, np.uint8).reshape(1, -1))[0])


def value_hashes(column: np.ndarray, salt: int = 0) -> np.ndarray:
    """uint64 [n]: each value of a column hashed on its own (a redacted feature: equal values stay equal)."""
    column = np.asarray(column)
    return row_hashes(column.reshape(len(column), -1), salt)
