"""Adaptive batching: pick the batch size and the wait online, to a p99 latency target.

Set by `parameters { key: "latency_target_ms" value: { string_value: "10" } }`
in a model's config.pbtxt (and, optionally, `fleet.adaptive.max_utilization`).

A fixed `max_queue_delay_microseconds` is wrong at one end of the load range or
the other. fleet's fixed-delay batcher is work-conserving (an idle model takes
whatever is queued), so under a rising load it runs the model as often as it
can: with batches of one or two rows the model is busy most of the time, and on
a CPU it takes the cores the HTTP work needs, so latency climbs and the model
saturates early. A long fixed delay only helps once batches are full, and it is
paid by every request that waits for company.

The adaptive policy instead:

- learns the batch service time online as `t(b) = a + c*b` (exponentially
  weighted least squares over the batches it ran);
- estimates the arrival rate `r` (rows/s) over the last ~50 ms;
- sends a batch once it holds the smallest `b` that keeps the model busy at
  most `max_utilization` of the time (`r * t(b) / b <= u`, default u = 0.5):
  the fewer rows per batch, the more of the CPU goes to the model's per-call
  cost instead of the requests; at low load that is one row, sent at once;
- while a batch runs, holds the queued rows until it ends (a batch sent then
  would only wait behind it), unless they already make a batch of `b`;
- with the model idle, never holds the oldest request longer than its share
  of the latency budget, `scale * target - 2 * t(b)` (its own batch plus one
  running ahead of it), and sends what it has then;
- watches the p99 of what it delivers (queue + compute) and shrinks the share
  of the target it plans with (`scale`) when the p99 runs over and its own
  waits are a real part of it, growing it back slowly while the p99 stays well
  under. When the p99 runs over with short waits the model is overloaded, and
  waiting less would only make smaller batches that load it more.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["ServiceTimeModel", "AdaptivePolicy", "DEFAULT_MAX_UTILIZATION"]

DEFAULT_MAX_UTILIZATION = 0.5


class ServiceTimeModel:
    """`t(rows) = a + c * rows` in seconds, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self._w = self._b = self._bb = self._t = self._bt = 0.0
        self.samples = 0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._b = d * self._b + rows
        self._bb = d * self._bb + rows * rows
        self._t = d * self._t + seconds
        self._bt = d * self._bt + rows * seconds
        self.samples += 1

    def coefficients(self) -> tuple[float, float]:
        """(a, c): fixed cost per batch and cost per row, both >= 0."""
        if self._w == 0:
            return 0.0, 0.0
        mean_b, mean_t = self._b / self._w, self._t / self._w
        var_b = self._bb / self._w - mean_b * mean_b
        if var_b <= 1e-9:  # one batch size seen so far: all of it counts as fixed cost
            return max(mean_t, 0.0), 0.0
        c = (self._bt / self._w - mean_b * mean_t) / var_b
        c = max(c, 0.0)
        a = max(mean_t - c * mean_b, 0.0)
        return a, c

    def predict(self, rows: int) -> float:
        a, c = self.coefficients()
        return a + c * rows


class AdaptivePolicy:
    """The decisions of one model version's batcher in adaptive mode (times in ns)."""

    RATE_WINDOW_NS = 50_000_000
    REPLAN_NS = 5_000_000
    WAIT_SHARE = 0.1  # held p99 above this share of the p99: the waits are part of what breaks the target
    TRACE_ENV = "FLEET_ADAPTIVE_TRACE"  # a folder: each policy appends its state there once a second

    def __init__(self, target_ms: float, max_batch_size: int, window: int = 512,
                 max_utilization: float = DEFAULT_MAX_UTILIZATION, name: str = "model"):
        if target_ms <= 0:
            raise ValueError(f"latency_target_ms must be > 0, got {target_ms}")
        if not 0 < max_utilization <= 1:
            raise ValueError(f"max_utilization must lie in (0, 1], got {max_utilization}")
        self.target_ns = int(target_ms * 1e6)
        self.max_batch_size = max(1, max_batch_size)
        self.max_utilization = max_utilization
        self.name = name
        self.model = ServiceTimeModel()
        self.scale = 0.5  # share of the target the plan uses (p99 feedback moves it)
        self._latencies = np.zeros(window, dtype=np.int64)
        self._held = np.zeros(window, dtype=np.int64)
        self.held_p99_ns: float | None = None
        self._filled = 0
        self._next = 0
        self._since_check = 0
        self.p99_ns: float | None = None
        self._window_start = 0
        self._window_rows = 0
        self.rate_rows_per_s = 0.0
        self._planned_ns = -1
        self.need_rows = 1
        self.max_wait_ns = 0
        trace = os.environ.get(self.TRACE_ENV)
        self._trace = os.path.join(trace, f"adaptive-{name}-{os.getpid()}.jsonl") if trace else None
        self._traced_ns = 0

    # -- observations -----------------------------------------------------------
    def on_arrival(self, now_ns: int, rows: int) -> None:
        if not self._window_start:
            self._window_start = now_ns
        self._window_rows += rows
        elapsed = now_ns - self._window_start
        if elapsed >= self.RATE_WINDOW_NS:
            rate = self._window_rows / (elapsed / 1e9)
            self.rate_rows_per_s = rate if not self.rate_rows_per_s else 0.5 * self.rate_rows_per_s + 0.5 * rate
            self._window_start, self._window_rows = now_ns, 0

    def on_batch(self, rows: int, service_ns: int) -> None:
        self.model.observe(rows, service_ns / 1e9)

    def on_latency(self, latency_ns: int, held_ns: int) -> None:
        """One request's time in the batcher, `held_ns` of it waiting by choice while the model was idle."""
        i = self._next
        self._latencies[i] = latency_ns
        self._held[i] = held_ns
        self._next = (i + 1) % len(self._latencies)
        self._filled = min(self._filled + 1, len(self._latencies))
        self._since_check += 1
        if self._since_check >= 64 and self._filled >= 64:
            self._since_check = 0
            self.p99_ns = p99 = float(np.percentile(self._latencies[: self._filled], 99))
            self.held_p99_ns = float(np.percentile(self._held[: self._filled], 99))
            if p99 > self.target_ns and self.held_p99_ns > self.WAIT_SHARE * p99:
                # Over the target, and the waits this policy chose are a real part of it: wait less.
                # (Over the target with short waits means an overloaded model: waiting less would
                # only shrink the batches and load it more, so the plan stands.)
                self.scale = max(0.1, self.scale * 0.8)
            elif p99 < 0.6 * self.target_ns:
                self.scale = min(0.9, self.scale * 1.05)
            self._planned_ns = -1

    # -- decisions ---------------------------------------------------------------
    def _rate_now(self, now_ns: int) -> float:
        """The rate estimate, decayed when arrivals stopped (no arrival, no window closes)."""
        if self._window_start and now_ns - self._window_start > 2 * self.RATE_WINDOW_NS:
            elapsed = (now_ns - self._window_start) / 1e9
            return min(self.rate_rows_per_s, self._window_rows / elapsed)
        return self.rate_rows_per_s

    def replan(self, now_ns: int) -> None:
        """Recompute the rows to wait for and the longest wait."""
        if self._planned_ns >= 0 and now_ns - self._planned_ns < self.REPLAN_NS:
            return
        self._planned_ns = now_ns
        a, c = self.model.coefficients()
        rate = self._rate_now(now_ns)
        u = self.max_utilization
        # The model busy at most u of the time: r * (a + c*b) / b <= u  <=>  b >= r*a / (u - r*c).
        if rate <= 0:
            need = 1
        elif rate * c >= u:
            need = self.max_batch_size  # even full batches keep it busier than u: send full ones
        else:
            need = math.ceil(rate * a / (u - rate * c))
        self.need_rows = min(self.max_batch_size, max(1, need))
        budget_s = self.scale * self.target_ns / 1e9
        self.max_wait_ns = max(0, int((budget_s - 2 * self.model.predict(self.need_rows)) * 1e9))
        if self._trace and now_ns - self._traced_ns >= 1_000_000_000:
            self._traced_ns = now_ns
            try:
                with open(self._trace, "a") as f:
                    f.write(json.dumps({"t_s": now_ns / 1e9, **self.describe()}) + "\n")
            except OSError:
                self._trace = None

    def plan(self, now_ns: int, queued_rows: int, head_wait_ns: int, inflight: int) -> int | None:
        """None: send the queued rows now; else ns to wait before deciding again.

        With a batch running, a batch sent now would only wait behind it: holding
        the rows until it ends costs no latency and makes the next batch bigger.
        """
        self.replan(now_ns)
        if queued_rows >= self.need_rows:
            return None
        if inflight:
            return self.target_ns  # until the running batch ends (which wakes the batcher)
        if head_wait_ns >= self.max_wait_ns:
            return None
        return self.max_wait_ns - head_wait_ns

    def send_at_once(self, now_ns: int, rows: int) -> bool:
        """May a request arriving at an idle, empty batcher go alone, without queueing?"""
        self.replan(now_ns)
        return rows >= self.need_rows or self.max_wait_ns == 0

    def describe(self) -> dict:
        a, c = self.model.coefficients()
        return {
            "target_ms": self.target_ns / 1e6, "scale": round(self.scale, 3),
            "p99_ms": None if self.p99_ns is None else round(self.p99_ns / 1e6, 2),
            "held_p99_ms": None if self.held_p99_ns is None else round(self.held_p99_ns / 1e6, 2),
            "max_utilization": self.max_utilization,
            "rate_rows_per_s": round(self.rate_rows_per_s, 1), "need_rows": self.need_rows,
            "max_wait_ms": self.max_wait_ns / 1e6,
            "batch_fixed_us": round(a * 1e6, 1), "per_row_us": round(c * 1e6, 3),
        }
