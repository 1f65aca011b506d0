"""Dynamic batching with Triton's semantics, one `Batcher` per model version.

A request joins the queue; the batcher hands whole batches (inputs concatenated
along the batch dimension) to an async `execute` callable, at most
`max_inflight_batches` at a time, and splits the outputs back per request.

When it sends a batch:
- at once when nothing is running (a lone request never waits for company);
- at once when the batch is full (`max_batch_size` rows, or the next request
  does not fit) or the queue fills a `preferred_batch_size`: then it sends the
  largest preferred size it can fill (or, when requests of several rows jump
  past the largest one, what fits below it), as Triton does;
- otherwise, while earlier batches are running, it waits for more requests up
  to `max_queue_delay_us` after the oldest one arrived.

With `latency_target_ms` set (adaptive mode), `serving.adaptive.AdaptivePolicy`
decides the wait instead of the fixed delay and preferred sizes.

Lanes: a batcher may run several versions of one model (a rollout's stable and candidate),
one `Lane` each (execute, preprocessing, observer, batch callback). Requests of all lanes share
the queue and the batches, so two versions cost the flushes of one; a batch holding several
lanes runs each lane's rows through that lane (`execute_lanes`, when given, runs them in one
call), answers each lane's requests from its own outputs, and a lane's failure fails only its
requests.

A request waits at most its timeout: the queue policy's default, or its own
(`parameters.timeout`) when `allow_timeout_override` is set and it is shorter
than the default (Triton's rule; with no default, any timeout of its own).
Past it, it is answered DeadlineExceeded without being computed. A full queue
(`max_queue_size`) refuses new requests with Overloaded.

Tracing (serving/telemetry/tracing.py), when this process traces: a request queued while its task's
`request_trace` is set gets a `queue` span, and a batch carrying one a `batch` span (linked to
each traced request) with `preprocess` and `compute` (serving/batch_exec.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.adaptive import DEFAULT_MAX_UTILIZATION, AdaptivePolicy
from serving.batch_exec import (
    Arrays, BatchExecution, BatchResult, Execute, ExecuteLanes, Lane, Observe, OnBatch, _Pending, batch_deadline_ns,
)
from serving.errors import DeadlineExceeded, InvalidInput, ModelUnavailable, Overloaded
from serving.telemetry.tracing import active as active_tracing, request_trace

if TYPE_CHECKING:
    from serving.preprocess import Preprocessor

__all__ = ["BatcherConfig", "BatchResult", "Batcher", "Lane", "batch_deadline_ns"]

_log = logging.getLogger("fleet.batching")

_NEVER = 1 << 62  # a row count no queue reaches

@dataclass(frozen=True)
class BatcherConfig:
    """Queue and batch limits; 0 means "none" for sizes and timeouts, as in Triton.

    `max_batch_size == 0` means the model takes no batch dimension: every
    request is executed alone, as it came.
    """

    max_batch_size: int
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = True
    max_inflight_batches: int = 2
    latency_target_ms: float = 0.0  # > 0: adaptive mode (serving/adaptive.py) instead of the fixed delay
    adaptive_max_utilization: float = DEFAULT_MAX_UTILIZATION  # adaptive mode: the model's busy share
    hold: bool = False  # wait `max_queue_delay_us` even when nothing runs (shadow copies: fewer, fuller batches)

    def __post_init__(self):
        if self.max_batch_size < 0 or self.max_queue_delay_us < 0 or self.max_queue_size < 0:
            raise ValueError("batcher sizes and delays must be >= 0")
        if self.max_inflight_batches < 1:
            raise ValueError("max_inflight_batches must be >= 1")


def _signature(inputs: Arrays, pre: "Preprocessor | None" = None) -> tuple:
    # Requests batch together only when every non-batch dimension and dtype agree, but for the
    # input a preprocessor assembles: it says what may share a batch (images of any size, say).
    return tuple((name, pre.signature(arr)) if pre is not None and name == pre.input_name
                 else (name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(inputs.items()))


class Batcher(BatchExecution):
    """Queue requests for one model version and execute them in batches."""

    def __init__(self, name: str, execute: Execute, config: BatcherConfig, on_batch: OnBatch | None = None,
                 preprocess: "Preprocessor | None" = None, observe: Observe | None = None):
        self.name = name
        self.preprocess = preprocess  # lane 0's: it says which requests may share a batch (`_signature`)
        self.config = config
        self.lanes: list[Lane] = [Lane(execute, preprocess, observe, on_batch)]
        self.execute_lanes: ExecuteLanes | None = None  # several lanes in one call; None: each lane's execute
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0  # rows in the queue, withdrawn requests included until they are dropped
        # The scheduling loop sleeps until a batch finishes, its timer fires, or the queue
        # reaches this many rows: an arrival below it cannot change the decision, so it
        # does not wake the loop (no O(queue) re-plan per request while a batch fills).
        self._wake_rows = 1
        self._inflight = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self._next_deadline_ns = 0  # 0: no queued request has a deadline
        self._preferred = sorted(config.preferred_batch_sizes)
        self._preferred_set = frozenset(self._preferred)
        self._cap = config.max_batch_size if config.max_batch_size > 0 else 1
        self._last_done_ns = 0  # when the last batch finished (adaptive mode's service times)
        self._observing = 0  # answered batches whose `observe` has not run yet (close() waits for them)
        self.tracing = active_tracing()  # this process's (serving/telemetry/), None when off: one check per request
        self.adaptive = (
            AdaptivePolicy(config.latency_target_ms, self._cap, max_utilization=config.adaptive_max_utilization,
                           name=name)
            if config.latency_target_ms > 0 and config.max_batch_size > 0 else None
        )

    def sibling(self, name: str, config: BatcherConfig) -> "Batcher":
        """Another batcher running the same model version (lane 0's execute, preprocessing, observer) by `config`."""
        lane = self.lanes[0]
        return Batcher(name, lane.execute, config, lane.on_batch, lane.preprocess, lane.observe)

    def add_lane(self, lane: Lane) -> int:
        """Another version of the model on this batcher's queue: its index, for `submit(lane=...)`. Its inputs
        must batch like lane 0's (same model config); its preprocessing may hold other statistics."""
        self.lanes.append(lane)
        return len(self.lanes) - 1

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet sent to the worker)."""
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Batches sent and not yet answered."""
        return self._inflight

    def admit(self) -> None:
        """Raise Overloaded (503, Retry-After) when the queue is full, ModelUnavailable when closed.

        `submit` checks it; the service also calls it before decoding a request body,
        so a refusal under overload costs no parsing.
        """
        if self._closed:
            raise ModelUnavailable(f"model {self.name} is shutting down")
        limit = self.config.max_queue_size
        if limit and len(self._queue) >= limit:
            raise Overloaded(
                f"model {self.name} is overloaded: its queue holds {len(self._queue)} requests "
                f"(max_queue_size {limit}); retry later",
                retry_after_s=1.0,
            )

    async def submit(self, inputs: Arrays, rows: int = 1, *, timeout_us: int | None = None,
                     meta=None, lane: int = 0) -> BatchResult:
        """Queue one request of `rows` batch rows and wait for its outputs.

        `inputs` must already be validated: for a batching model each array's
        first dimension is `rows`. Cancelling the caller withdraws the request.
        `meta` travels with the request to `observe` (None: not observed); `lane` says which lane runs it.
        """
        return await self.enqueue(inputs, rows, timeout_us=timeout_us, meta=meta, lane=lane)

    def enqueue(self, inputs: Arrays, rows: int = 1, *, timeout_us: int | None = None, meta=None,
                lane: int = 0) -> asyncio.Future:
        """`submit` without waiting: the future of the request's `BatchResult` (cancelling it withdraws the
        request). For a caller that wants no task of its own per request (shadow copies)."""
        self.admit()
        cfg = self.config
        if cfg.max_batch_size and not 1 <= rows <= cfg.max_batch_size:
            raise InvalidInput(f"batch of {rows} rows is outside 1..{cfg.max_batch_size} for model {self.name}")
        timeout = cfg.default_timeout_us
        if cfg.allow_timeout_override and timeout_us is not None and timeout_us > 0:
            # Triton: a request may shorten the default timeout, never lengthen it.
            timeout = min(timeout, timeout_us) if timeout else timeout_us
        now = time.monotonic_ns()
        if self.adaptive is not None:
            self.adaptive.on_arrival(now, rows)
        deadline = now + timeout * 1000 if timeout else 0
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, _signature(inputs, self.preprocess) if cfg.max_batch_size else None,
                           loop.create_future(), now, deadline, meta, lane,
                           None if self.tracing is None else request_trace.get())
        if (not self._queue and self._inflight == 0 and not cfg.hold
                and (self.adaptive is None or self.adaptive.send_at_once(now, rows))):
            # Nothing queued and nothing running: send at once, no hop through the loop.
            self._dispatch([pending], now)
        else:
            self._queue.append(pending)
            self._queued_rows += rows
            wake = self._queued_rows >= self._wake_rows or pending.signature != self._queue[0].signature
            if deadline and (not self._next_deadline_ns or deadline < self._next_deadline_ns):
                self._next_deadline_ns = deadline
                wake = True
            if self._task is None or self._task.done():
                self._ensure_loop()
            elif wake:
                self._wake.set()
        return pending.future

    async def close(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests; let queued ones finish for up to `drain_timeout_s`, fail the rest."""
        self._closed = True
        if drain_timeout_s > 0:
            end = time.monotonic() + drain_timeout_s
            while (self._queue or self._inflight) and time.monotonic() < end:
                self._wake.set()
                await asyncio.sleep(0.005)
        while self._observing:  # answered batches still to be logged: a callback of this loop each, right away
            await asyncio.sleep(0)
        if self._task is not None:
            self._task.cancel()
        error = ModelUnavailable(f"model {self.name} is shutting down")
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(error)
        self._queued_rows = 0

    # -- the scheduling loop ---------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = time.monotonic_ns()
            if self._next_deadline_ns and now >= self._next_deadline_ns:
                self._expire(now)
            wait_ns = None
            wake_rows = 1  # queue empty: any arrival may be sent
            while self._queue and self._inflight < self.config.max_inflight_batches:
                take, wait_ns, wake_rows = self._plan(now)
                if not take:
                    break
                self._dispatch([self._popleft() for _ in range(take)], now)
                wait_ns, wake_rows = None, 1
            if self._inflight >= self.config.max_inflight_batches:
                wake_rows = _NEVER  # nothing can go until a batch finishes (which wakes the loop)
            self._wake_rows = wake_rows
            if self._next_deadline_ns:
                until_deadline = max(0, self._next_deadline_ns - now)
                wait_ns = until_deadline if wait_ns is None else min(wait_ns, until_deadline)
            if wait_ns is None:
                await self._wake.wait()
            elif wait_ns > 0:
                timer = loop.call_later(wait_ns / 1e9, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()

    def _popleft(self) -> _Pending:
        p = self._queue.popleft()
        self._queued_rows -= p.rows
        return p

    def _plan(self, now: int) -> tuple[int, int | None, int]:
        """(queued requests to send now, 0 if none; ns to wait otherwise; queued rows that end the wait)."""
        queue = self._queue
        while queue and queue[0].future.done():  # withdrawn by its client
            self._popleft()
        if not queue:
            return 0, None, 1
        head = queue[0]
        if not self.config.max_batch_size:
            return 1, None, 1
        rows = count = 0
        preferred = 0  # requests making up the preferred batch to send, 0 if none
        full = False
        for p in queue:
            if p.future.done():
                # A withdrawn request in the middle: drop it now, re-plan.
                self._queue = collections.deque(q for q in queue if not q.future.done())
                self._queued_rows = sum(q.rows for q in self._queue)
                return self._plan(now)
            if p.signature != head.signature or rows + p.rows > self._cap:
                full = True
                break
            if self._preferred and not preferred and count and rows + p.rows > self._preferred[-1]:
                # This request would grow the batch past every preferred size: stop before it.
                preferred = count
            rows += p.rows
            count += 1
            if rows in self._preferred_set:
                preferred = count
        if rows >= self._cap:
            full = True
        waited = now - head.enqueued_ns
        if self.adaptive is not None:
            wait_ns = None if full else self.adaptive.plan(now, rows, waited, self._inflight)
            if wait_ns is None:
                return count, None, 1
            return 0, wait_ns, min(self._cap, self.adaptive.need_rows)
        delay = self.config.max_queue_delay_us * 1000
        delay_over = bool(delay) and waited >= delay
        if preferred and not delay_over:
            return preferred, None, 1
        if full or (self._inflight == 0 and not self.config.hold) or not delay or delay_over:
            return count, None, 1
        # Waiting for the delay: an arrival matters once the rows reach a preferred size or a full batch.
        larger = [size for size in self._preferred if size > rows]
        return 0, delay - waited, larger[0] if larger else self._cap

    def _expire(self, now: int) -> None:
        kept: collections.deque[_Pending] = collections.deque()
        next_deadline = 0
        for p in self._queue:
            if p.future.done():
                continue
            if p.deadline_ns and now >= p.deadline_ns:
                waited_ms = (now - p.enqueued_ns) / 1e6
                p.future.set_exception(
                    DeadlineExceeded(
                        f"request to model {self.name} timed out after {waited_ms:.1f} ms in the queue "
                        f"(timeout {(p.deadline_ns - p.enqueued_ns) / 1e6:.1f} ms)"
                    )
                )
                continue
            kept.append(p)
            if p.deadline_ns and (not next_deadline or p.deadline_ns < next_deadline):
                next_deadline = p.deadline_ns
        self._queue = kept
        self._queued_rows = sum(p.rows for p in kept)
        self._next_deadline_ns = next_deadline
