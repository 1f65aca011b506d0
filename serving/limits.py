"""Request limits: what one inference request may hold, checked before its work is done.

Each check raises InvalidInput (400) whose message says what was over which
limit and which setting raises it (`max_tensor_elements`, `FLEET_MAX_TENSOR_ELEMENTS`, ...).
The body size (`max_request_bytes`, 413) is enforced by the HTTP layer before
the body is read; the checks here run on the bytes of the JSON header before it is
parsed (nesting depth), on each input's declared shape before its data is
converted (element count), on every string fleet reads, and on the batch rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from serving.errors import InvalidInput

__all__ = ["RequestLimits", "over_limit", "check_json_depth", "check_string", "check_strings", "short_strings",
           "json_depth"]


@dataclass(frozen=True)
class RequestLimits:
    """The limits `serving.protocol.decode_request` and `serving.validation` enforce; 0 means none."""

    max_tensor_elements: int = 1 << 26  # per input, from its declared shape
    max_string_bytes: int = 1 << 20  # each BYTES element, id, name, parameter key or value (UTF-8 bytes)
    max_json_depth: int = 32  # arrays and objects open at once, anywhere in the JSON header
    max_batch_rows: int = 0  # rows of one request, on top of the model's max_batch_size

    @classmethod
    def from_options(cls, options) -> "RequestLimits":
        """The limits of a `ServingOptions`."""
        return cls(options.max_tensor_elements, options.max_string_bytes, options.max_json_depth,
                   options.max_batch_rows)


def over_limit(what: str, limit: int, setting: str, unit: str = "") -> str:
    """The message of a refusal: `what` (already saying how much) against `limit`, and the setting that raises it."""
    return f"{what} is over the limit of {limit}{unit} (setting {setting}, env FLEET_{setting.upper()})"


# -- JSON nesting ---------------------------------------------------------------

_ESCAPE = re.compile(rb"\\.", re.S)  # a backslash escape inside a string: never a quote or bracket
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_STEP = np.zeros(256, np.int64)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')
_CHUNK = 1 << 20  # structural bytes per step: int64 temporaries of 8 MB


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON `text` (brackets inside strings do not count).

    Vectorised over the bytes (no parse), in chunks so that its memory stays a few MB
    whatever the body: it answers in about a millisecond per 100 kB even for 100,000
    nested brackets that a parser would refuse. Malformed text gets a number too; the
    parser says what is wrong with it.
    """
    if b"\\" in text:
        text = _ESCAPE.sub(b"", text)
    structure = np.frombuffer(text.translate(None, _NOT_STRUCTURE), np.uint8)
    quoted = b'"' in text
    depth = deepest = quotes = 0
    for start in range(0, len(structure), _CHUNK):
        part = structure[start : start + _CHUNK]
        steps = _STEP[part]
        if quoted:  # a bracket after an odd number of quotes is inside a string
            seen = np.cumsum(part == _QUOTE, dtype=np.int64) + quotes
            steps *= (seen & 1) == 0
            quotes = int(seen[-1])
        levels = np.cumsum(steps) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def check_json_depth(text: bytes, limit: int) -> None:
    """Raise InvalidInput when JSON `text` nests deeper than `limit` (0: no limit)."""
    if not limit or text.count(b"[") + text.count(b"{") <= limit:  # the common case: a few brackets
        return
    depth = json_depth(text)
    if depth > limit:
        raise InvalidInput(over_limit(f"the request's JSON nesting depth of {depth}", limit, "max_json_depth"))


# -- strings --------------------------------------------------------------------


def check_string(value: str | bytes, what: str, limit: int) -> None:
    """Raise InvalidInput when `value` is longer than `limit` bytes (UTF-8 for str; 0: no limit)."""
    if not limit or len(value) * (4 if isinstance(value, str) else 1) <= limit:
        return  # no need to encode: even 4 bytes a character fit
    size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
    if size > limit:
        raise InvalidInput(over_limit(f"{what} of {size} bytes", limit, "max_string_bytes", " bytes"))


def short_strings(value, limit: int) -> bool:
    """A quick sufficient test that `check_strings(value, ..., limit)` passes: `value` is a dict whose keys are
    str and whose values are str, numbers, bools or None, no string longer than `limit` // 4 characters (at most
    4 bytes each in UTF-8: within the limit without encoding them). False says nothing: check them."""
    if not limit:
        return True
    if type(value) is not dict:
        return False
    chars = limit // 4
    for key, inner in value.items():
        if type(key) is not str or len(key) > chars:
            return False
        kind = type(inner)
        if kind is str:
            if len(inner) > chars:
                return False
        elif kind is not int and kind is not float and kind is not bool and inner is not None:
            return False
    return True


def check_strings(value, what: str, limit: int) -> None:
    """`check_string` on every key and string value inside `value` (parameters: dicts, lists, scalars)."""
    if not limit:
        return
    if short_strings(value, limit):  # the usual parameters, without naming each string
        return
    stack = [(value, what)]  # a loop, not recursion: the nesting may be as deep as the parser allows
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            check_string(item, where, limit)
        elif isinstance(item, dict):
            for key, inner in item.items():
                check_string(key, f"{where} key", limit)
                stack.append((inner, f"{where}[{key[:32]!r}]"))
        elif isinstance(item, list):
            stack.extend((inner, where) for inner in item)
