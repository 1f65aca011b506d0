"""API keys, the admin token and per-client rate limits at the HTTP edge.

Who may call what:
- open to anyone: health (live, ready, a model's ready), server metadata (`GET /v2`)
  and `GET /openapi.json` — what load balancers and probes need;
- the inference rule: inference, model metadata/config/stats/features, the repository
  index and `/metrics`. With API keys configured each needs `Authorization: Bearer <key>`
  (an inference key or the admin token); without, they are open;
- admin (`Access.ADMIN`: repository load/unload, version pins): always the admin token.
  With no admin token configured the admin endpoints are off: 403 for everyone.

Answers give no hint of which part was wrong: a missing header, a malformed one and
an unknown key get the same 401 (with `WWW-Authenticate: Bearer`); a valid inference
key on an admin endpoint gets 403.

Only SHA-256 digests of the keys are ever held (`key_digest`; the config turns keys into
digests as it reads them, so neither the replicas' options nor `fleet up`'s state file
carry a key). A presented key is hashed once and compared with `hmac.compare_digest`
against every configured digest, all of them, whatever matched: the time taken does
not depend on which key (if any) it was.

Rate limit (`RateLimiter`): a token bucket per key — per client address when no keys are
configured — in each ingress replica, so the cluster-wide limit of one client is up to
`ingress replicas × rate_limit_rps` (the kernel spreads connections, not requests, over
the replicas: dividing the rate by the replica count would hold a client on one
keep-alive connection to a fraction of it). Over the rate: 429 with Retry-After, at once.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import math
import time
from typing import Iterable

from serving.errors import Forbidden, RateLimited, Unauthorized

__all__ = [
    "Access", "Guard", "RateLimiter", "TokenBucket", "key_digest", "as_digest", "parse_bearer", "key_id",
    "DIGEST_PREFIX", "UNAUTHORIZED_MESSAGE", "FORBIDDEN_MESSAGE", "ADMIN_OFF_MESSAGE",
]

DIGEST_PREFIX = "sha256:"
_HEX = frozenset("0123456789abcdef")
_MAX_KEY_BYTES = 4096  # a longer Authorization value is refused unhashed (bounded work per request)

UNAUTHORIZED_MESSAGE = "missing or invalid credentials: send 'Authorization: Bearer <key>'"
FORBIDDEN_MESSAGE = "these credentials may not call this endpoint"
ADMIN_OFF_MESSAGE = "admin endpoints are disabled on this server: no admin_token is configured"


class Access(enum.Enum):
    """Which credentials an endpoint needs (see the module docstring)."""

    OPEN = "open"
    INFERENCE = "inference"
    ADMIN = "admin"


def key_digest(key: str) -> str:
    """`sha256:<hex>` of a key: what config and replicas keep instead of the key."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def as_digest(value: str) -> str:
    """A configured key as its digest; a value already written as `sha256:<64 hex>` stays as it is.

    So fleet.yaml may hold digests instead of keys, and settings read twice (the CLI, then
    the supervisor it starts) hash each key once.
    """
    value = value.strip()
    if not value:
        raise ValueError("an API key or admin token must not be empty")
    body = value[len(DIGEST_PREFIX):].lower()
    if value.startswith(DIGEST_PREFIX) and len(body) == 64 and set(body) <= _HEX:
        return DIGEST_PREFIX + body
    return key_digest(value)


KEY_ID_BYTES = 6


def key_id(digest: bytes) -> str:
    """A key's id in logs: the first 12 hex digits of its SHA-256 (what `key_digest` shows after 'sha256:').

    It names a key without revealing it: the digest of a random key cannot be reversed.
    """
    return digest[:KEY_ID_BYTES].hex()


def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest[len(DIGEST_PREFIX):])


def parse_bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The SHA-256 (raw 32 bytes) of the key in `Authorization: Bearer <key>`, or None when absent/malformed.

    `headers`: (lower-cased name, value) pairs as both front ends hand them.
    """
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.strip().partition(b" ")
            key = key.strip()
            if scheme.lower() != b"bearer" or not key or len(key) > _MAX_KEY_BYTES or b" " in key:
                return None
            return hashlib.sha256(key).digest()
    return None


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; a request takes one. Pure arithmetic, time passed in."""

    __slots__ = ("rate_per_s", "burst", "tokens", "at_s")

    def __init__(self, rate_per_s: float, burst: float, now_s: float):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and burst >= 1, got {rate_per_s} and {burst}")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)  # a new client starts with a full bucket
        self.at_s = now_s

    def take(self, now_s: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there will be (nothing taken)."""
        tokens = min(self.burst, self.tokens + max(0.0, now_s - self.at_s) * self.rate_per_s)
        self.at_s = max(self.at_s, now_s)
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate_per_s

    def idle_full(self, now_s: float) -> bool:
        """True when the bucket has refilled: dropping it and starting afresh changes nothing."""
        return self.tokens + (now_s - self.at_s) * self.rate_per_s >= self.burst


class RateLimiter:
    """Token buckets per client (a key's digest or an address), at most `max_clients` of them.

    Memory is bounded: buckets are kept least recently used first; the oldest is dropped
    once it has refilled (idle: nothing lost), and when `max_clients` are tracked the
    oldest goes whatever its state (that client starts again with a full bucket).
    """

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000, clock=time.monotonic):
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        TokenBucket(rate_per_s, burst, 0.0)  # validates the two
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: collections.OrderedDict[object, TokenBucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, client: object) -> None:
        """Count a request of `client`; raise RateLimited (429, Retry-After in whole seconds) when over the rate."""
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            if buckets:
                oldest = next(iter(buckets.values()))
                if len(buckets) >= self.max_clients or oldest.idle_full(now):
                    buckets.popitem(last=False)
            bucket = buckets[client] = TokenBucket(self.rate_per_s, self.burst, now)
        else:
            buckets.move_to_end(client)
        wait_s = bucket.take(now)
        if wait_s > 0.0:
            raise RateLimited(f"rate limit of {self.rate_per_s:g} requests/s (burst {self.burst}) exceeded; "
                              f"retry in {wait_s:.2f} s", retry_after_s=float(math.ceil(wait_s)))


class Guard:
    """The credential and rate checks of one ingress replica, built from its ServingOptions.

    `key_digests`, `admin_digest`: `sha256:<hex>` strings (see `as_digest`).
    """

    def __init__(self, key_digests: Iterable[str] = (), admin_digest: str | None = None,
                 limiter: RateLimiter | None = None):
        self._keys = tuple(_raw(as_digest(d)) for d in dict.fromkeys(key_digests))
        self._admin = _raw(as_digest(admin_digest)) if admin_digest else None
        # The admin token is accepted wherever an inference key is.
        self._inference = self._keys + ((self._admin,) if self._admin is not None and self._keys else ())
        self.limiter = limiter
        self.keys_required = bool(self._keys)
        self.admin_enabled = self._admin is not None
        # Nothing to check per inference request: the hot path skips the guard altogether.
        self.inference_free = not self.keys_required and limiter is None

    @classmethod
    def from_options(cls, options) -> "Guard":
        """The guard a `serving.options.ServingOptions` asks for."""
        limiter = None
        if options.rate_limit_rps:
            limiter = RateLimiter(options.rate_limit_rps, options.rate_limit_burst, options.rate_limit_max_clients)
        return cls(options.api_key_digests, options.admin_token_digest, limiter)

    @staticmethod
    def _matches(presented: bytes, digests: tuple[bytes, ...]) -> bool:
        # Every digest is compared, whatever matched already: no early exit to time.
        found = False
        for digest in digests:
            found |= hmac.compare_digest(digest, presented)
        return found

    def inference(self, headers: Iterable[tuple[bytes, bytes]], client: tuple | None = None) -> str | None:
        """Check an inference-rule request: its key when keys are configured, then its rate.

        Returns the key's id (`key_id`: a prefix of its digest, for the prediction log), None without keys.
        """
        key = None
        if self.keys_required:
            presented = parse_bearer(headers)
            if presented is None or not self._matches(presented, self._inference):
                raise Unauthorized(UNAUTHORIZED_MESSAGE)
            who: object = presented
            key = key_id(presented)
        else:
            who = client[0] if client else None
        if self.limiter is not None:
            self.limiter.check(who)
        return key

    def admin(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Check an admin request: the admin token (403 when admin endpoints are off, or for an inference key)."""
        if self._admin is None:
            raise Forbidden(ADMIN_OFF_MESSAGE)
        presented = parse_bearer(headers)
        if presented is None:
            raise Unauthorized(UNAUTHORIZED_MESSAGE)
        is_admin = hmac.compare_digest(self._admin, presented)
        is_key = self._matches(presented, self._keys)
        if is_admin:
            return
        if is_key:
            raise Forbidden(FORBIDDEN_MESSAGE)
        raise Unauthorized(UNAUTHORIZED_MESSAGE)

    def check(self, access: Access, headers: Iterable[tuple[bytes, bytes]], client: tuple | None = None) -> None:
        """The check of `access` (nothing for OPEN)."""
        if access is Access.INFERENCE:
            if not self.inference_free:
                self.inference(headers, client)
        elif access is Access.ADMIN:
            self.admin(headers)
