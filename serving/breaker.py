"""A circuit breaker per model backend: stop sending batches to a backend that keeps failing, probe it back.

    closed ──N consecutive failed batches──▶ open ──cool-down──▶ half-open (one probe batch)
      ▲                                        ▲                     │
      └──────────── the probe succeeds ────────┼─────────────────────┤
                                               └── the probe fails ──┘ (cool-down doubled, up to a cap)

While open, `allow()` is False: the ingress answers from the model's fallback
(`fleet.fallback`) or refuses at once with 503 and Retry-After, and the dead
backend sees nothing. After the cool-down the next `allow()` admits one probe
batch; others keep going to the fallback until it is answered. Plain Python on
the event loop (no locks, no Ray); the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["BreakerConfig", "CircuitBreaker", "CLOSED", "OPEN", "HALF_OPEN"]

_log = logging.getLogger("fleet.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """`failures` consecutive failed batches open it; the first cool-down, doubled per failed probe up to the cap."""

    failures: int = 5
    cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0

    def __post_init__(self):
        if self.failures < 1 or self.cooldown_s <= 0 or self.max_cooldown_s < self.cooldown_s:
            raise ValueError(f"breaker needs failures >= 1 and 0 < cooldown_s <= max_cooldown_s, got {self}")


class CircuitBreaker:
    """One backend's breaker; `allow()` before a batch, then `success()` or `failure()` with its outcome."""

    def __init__(self, name: str, config: BreakerConfig = BreakerConfig(), clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.config = config
        self._clock = clock
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened = 0  # times it opened (from closed or after a failed probe)
        self.last_error: str | None = None
        self._cooldown_s = config.cooldown_s
        self._retry_at = 0.0  # open: when the probe may go
        self._probing = False  # half-open: the probe batch is out

    def allow(self) -> bool:
        """May a batch go to the backend now? While open, True once per cool-down: that batch is the probe."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self._clock() >= self._retry_at:
            self.state = HALF_OPEN
            _log.info("model %s: circuit breaker half-open, probing the backend", self.name,
                      extra={"model": self.name, "event": "breaker_half_open"})
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def would_allow(self) -> bool:
        """What `allow()` would answer, without taking the probe: for routing a request before its batch."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() >= self._retry_at
        return not self._probing

    def success(self) -> None:
        """A batch the backend answered: close (a probe that succeeds closes it) and reset the cool-down."""
        if self.state != CLOSED:
            _log.info("model %s: circuit breaker closed, the backend answers again", self.name,
                      extra={"model": self.name, "event": "breaker_closed"})
        self.state = CLOSED
        self.consecutive_failures = 0
        self._cooldown_s = self.config.cooldown_s
        self._probing = False
        self.last_error = None

    def failure(self, error: str = "") -> None:
        """A batch the backend could not answer (down, unreachable, failing)."""
        self.last_error = error or self.last_error
        self.consecutive_failures += 1
        if self.state == HALF_OPEN:
            # The probe failed: wait longer before the next one.
            self._cooldown_s = min(2 * self._cooldown_s, self.config.max_cooldown_s)
            self._open()
        elif self.state == CLOSED and self.consecutive_failures >= self.config.failures:
            self._open()

    def _open(self) -> None:
        self.state = OPEN
        self.opened += 1
        self._probing = False
        self._retry_at = self._clock() + self._cooldown_s
        _log.warning("model %s: %s; next probe in %.1f s", self.name, self.describe(), self._cooldown_s,
                     extra={"model": self.name, "event": "breaker_open"})

    @property
    def retry_after_s(self) -> float:
        """Seconds until the next probe may go (0 when closed or due)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._retry_at - self._clock())

    def describe(self) -> str:
        """One line for the repository index and logs."""
        if self.state == CLOSED:
            return "closed"
        detail = f" after {self.consecutive_failures} failed batches"
        if self.last_error:
            detail += f" ({self.last_error})"
        return f"circuit breaker {self.state.replace('_', '-')}{detail}"
