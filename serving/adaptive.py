"""Adaptive batching: pick the batch size and the wait online, to a p99 latency target.

Set by `parameters { key: "latency_target_ms" value: { string_value: "10" } }`
in a model's config.pbtxt. Triton's dynamic batcher waits a fixed
`max_queue_delay_microseconds`: too long at low load (every request pays the
wait), too short at high load (small batches waste compute on per-batch
overhead, so the model saturates earlier). The adaptive policy instead:

- learns the batch service time online as `t(b) = a + c*b` (exponentially
  weighted least squares over the batches it ran);
- learns what the process spends in CPU per request and per batch (the HTTP,
  decoding and batch assembly around the model), by regressing the process's
  CPU time over ~100 ms windows on the requests and batches in them;
- estimates the arrival rate over the last ~100 ms;
- sends a batch once it holds the rows the current rate needs: enough that
  the model keeps up (`b / t(b)` covers the rate with 20 % headroom) and that
  the per-batch CPU, spread over `b` requests, leaves the process's CPU budget
  unsaturated — fewer rows would let the queue grow — or once the oldest request
  has used its share of the latency budget (`budget - 2*t(b)`: its own batch
  plus one running ahead of it);
- and, within that budget, waits for a batch big enough that its fixed CPU
  cost is at most a quarter of what its requests cost (small batches on a busy
  CPU steal time from the HTTP work and raise everyone's latency);
- watches the p99 of what it delivers (queue + compute) and shrinks the wait
  it plans with when the p99 runs over the target, growing it back slowly.

A lone request still goes out at once when nothing is running.
"""

from __future__ import annotations

import math
import time

import numpy as np

__all__ = ["ServiceTimeModel", "CpuCostModel", "AdaptivePolicy"]


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


class CpuCostModel:
    """CPU seconds = per_request * requests + per_batch * batches, over windows (EW least squares, no intercept)."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self._rr = self._rb = self._bb = self._ry = self._by = 0.0
        self.samples = 0

    def observe(self, requests: int, batches: int, cpu_s: float) -> None:
        d = self.decay
        self._rr = d * self._rr + requests * requests
        self._rb = d * self._rb + requests * batches
        self._bb = d * self._bb + batches * batches
        self._ry = d * self._ry + requests * cpu_s
        self._by = d * self._by + batches * cpu_s
        self.samples += 1

    def coefficients(self) -> tuple[float, float]:
        """(per_request_s, per_batch_s), both >= 0; (0, 0) until there is data."""
        det = self._rr * self._bb - self._rb * self._rb
        if self._rr <= 0:
            return 0.0, 0.0
        if abs(det) <= 1e-12 * max(self._rr * self._bb, 1e-30):
            return max(self._ry / self._rr, 0.0), 0.0  # batches and requests moved together: all per request
        per_request = (self._ry * self._bb - self._by * self._rb) / det
        per_batch = (self._by * self._rr - self._ry * self._rb) / det
        if per_batch < 0:
            return max(self._ry / self._rr, 0.0), 0.0
        if per_request < 0:
            return 0.0, max(self._by / self._bb, 0.0)
        return per_request, per_batch


class AdaptivePolicy:
    """The decisions of one model version's batcher in adaptive mode (times in ns)."""

    RATE_WINDOW_NS = 100_000_000
    REPLAN_NS = 10_000_000
    HEADROOM = 1.2
    EFFICIENCY = 0.25
    CPU_WINDOW_NS = 100_000_000

    def __init__(self, target_ms: float, max_batch_size: int, window: int = 512, cpu_budget: float = 0.9,
                 cpu_clock=time.process_time):
        if target_ms <= 0:
            raise ValueError("latency_target_ms must be > 0")
        self.target_ns = int(target_ms * 1e6)
        self.max_batch_size = max(1, max_batch_size)
        self.model = ServiceTimeModel()
        self.cpu = CpuCostModel()
        self.cpu_budget = cpu_budget  # CPU seconds per second the batching process may plan to use
        self._cpu_clock = cpu_clock
        self._cpu_mark = (0, 0.0, 0, 0)  # (ns, cpu s, requests, batches) at the window's start
        self._requests = 0
        self._batches = 0
        self.scale = 0.5  # share of the target the plan uses (p99 feedback moves it)
        self._latencies = np.zeros(window, dtype=np.int64)
        self._filled = 0
        self._next = 0
        self._since_check = 0
        self._window_start = 0
        self._window_rows = 0
        self.rate_rows_per_s = 0.0
        self._planned_ns = -1
        self.need_rows = 1
        self.max_wait_ns = 0

    # -- observations -----------------------------------------------------------
    def on_arrival(self, now_ns: int, rows: int) -> None:
        self._requests += 1
        if not self._window_start:
            self._window_start = now_ns
        self._window_rows += rows
        elapsed = now_ns - self._window_start
        if elapsed >= self.RATE_WINDOW_NS:
            rate = self._window_rows / (elapsed / 1e9)
            self.rate_rows_per_s = rate if not self.rate_rows_per_s else 0.5 * self.rate_rows_per_s + 0.5 * rate
            self._window_start, self._window_rows = now_ns, 0

    def on_batch(self, rows: int, service_ns: int, now_ns: int = 0) -> None:
        self.model.observe(rows, service_ns / 1e9)
        self._batches += 1
        if now_ns:
            self._sample_cpu(now_ns)

    def _sample_cpu(self, now_ns: int) -> None:
        start_ns, cpu0, requests0, batches0 = self._cpu_mark
        if start_ns and now_ns - start_ns < self.CPU_WINDOW_NS:
            return
        cpu = self._cpu_clock()
        if start_ns:
            self.cpu.observe(self._requests - requests0, self._batches - batches0, cpu - cpu0)
        self._cpu_mark = (now_ns, cpu, self._requests, self._batches)

    def on_latency(self, latency_ns: int) -> None:
        self._latencies[self._next] = latency_ns
        self._next = (self._next + 1) % len(self._latencies)
        self._filled = min(self._filled + 1, len(self._latencies))
        self._since_check += 1
        if self._since_check >= 64 and self._filled >= 64:
            self._since_check = 0
            p99 = float(np.percentile(self._latencies[: self._filled], 99))
            if p99 > self.target_ns:
                self.scale = max(0.1, self.scale * 0.8)
            elif p99 < 0.6 * self.target_ns:
                self.scale = min(0.9, self.scale * 1.05)
            self._planned_ns = -1

    # -- decisions ---------------------------------------------------------------
    def replan(self, now_ns: int) -> None:
        """Recompute the rows to wait for, the batch cap and the longest wait."""
        if self._planned_ns >= 0 and now_ns - self._planned_ns < self.REPLAN_NS:
            return
        self._planned_ns = now_ns
        budget_s = self.scale * self.target_ns / 1e9
        a, c = self.model.coefficients()
        rate = self.rate_rows_per_s * self.HEADROOM
        # The model keeps up: smallest b with b / (a + c*b) >= rate  <=>  b >= rate*a / (1 - rate*c).
        if rate <= 0:
            need = 1
        elif rate * c >= 1:
            need = self.max_batch_size  # the model cannot keep up: full batches
        else:
            need = math.ceil(rate * a / (1 - rate * c))
        per_request, per_batch = self.cpu.coefficients()
        if per_batch > 0 and per_request > 0:
            # The batch is worth its overhead: per-batch CPU at most EFFICIENCY of what its requests cost.
            need = max(need, math.ceil(per_batch / (self.EFFICIENCY * per_request)))
            # The process keeps up: rate * (per_request + per_batch / b) <= cpu_budget.
            spare = self.cpu_budget - rate * per_request
            if rate > 0:
                need = max(need, self.max_batch_size if spare <= 0 else math.ceil(rate * per_batch / spare))
        self.need_rows = min(self.max_batch_size, max(1, need))
        self.max_wait_ns = max(0, int((budget_s - 2 * self.model.predict(self.need_rows)) * 1e9))

    def plan(self, now_ns: int, queued_rows: int, head_wait_ns: int, inflight: int) -> int | None:
        """None: send the queued rows now; else ns to wait before deciding again."""
        self.replan(now_ns)
        if inflight == 0 or queued_rows >= self.need_rows or head_wait_ns >= self.max_wait_ns:
            return None
        return self.max_wait_ns - head_wait_ns

    def describe(self) -> dict:
        a, c = self.model.coefficients()
        per_request, per_batch = self.cpu.coefficients()
        return {
            "target_ms": self.target_ns / 1e6, "scale": round(self.scale, 3),
            "cpu_per_request_us": round(per_request * 1e6, 1), "cpu_per_batch_us": round(per_batch * 1e6, 1),
            "rate_rows_per_s": round(self.rate_rows_per_s, 1), "need_rows": self.need_rows,
            "max_wait_ms": self.max_wait_ns / 1e6,
            "batch_fixed_us": round(a * 1e6, 1), "per_row_us": round(c * 1e6, 3),
        }
