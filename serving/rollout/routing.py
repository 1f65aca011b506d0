"""Per-request routing during a rollout: which version answers, sticky by routing key.

A request goes to the candidate when a hash of its routing key falls under the candidate's
weight. The key is, first found: the v2 request parameter `routing_key`, the header
`fleet-routing-key`, the caller's API key id, the request's id. The same key always lands on
the same side at a given weight, and raising the weight only moves keys toward the candidate
(the keys under 5 % are also under 20 %). The hash is BLAKE2b, not the CRC32 the prediction
log samples with, so logging a share of requests picks no side.
"""

from __future__ import annotations

import hashlib

__all__ = ["ROUTING_PARAM", "ROUTING_HEADER", "routing_key", "key_point", "to_candidate"]

ROUTING_PARAM = "routing_key"
ROUTING_HEADER = "fleet-routing-key"
_SCALE = float(1 << 64)


def routing_key(parameters: dict, header: str | None, key_id: str | None, request_id: str | None) -> str | None:
    """The request's routing key (see the module docstring); None when it has none of them."""
    value = parameters.get(ROUTING_PARAM) if parameters else None
    if value is not None and value != "":
        return str(value)
    return header or key_id or request_id


def key_point(key: str) -> float:
    """Where `key` falls in [0, 1): uniform over keys, the same in every replica and process."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def to_candidate(key: str, weight: float) -> bool:
    """Whether the request with routing key `key` goes to the candidate at `weight` (0..1)."""
    if weight <= 0.0:
        return False
    return weight >= 1.0 or key_point(key) < weight
