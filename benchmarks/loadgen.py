"""An asyncio HTTP/1.1 load generator for what wrk cannot do: open loop, steps, mixed targets.

Open loop (`open_loop`, `step_load`): every send time is drawn up front
(`arrival_times`), and each latency is measured from the request's *intended*
send time, not from when it actually went out. A request that waits for a free
connection, or is sent late because the server stalled, keeps that wait in its
latency, so coordinated omission cannot hide a stall. (It also means a
generator too slow for the rate shows up as latency: on a shared machine, check
that the generator is not the bottleneck.) Event-loop timers are good to about
a millisecond, so a request may go out up to 0.5 ms early; its latency then
counts from the actual send. Closed loop (`closed_loop`): N connections each
send the next request when the previous answer arrives; latency is from the
actual send.

Requests go over keep-alive connections opened on demand, through the
callback-driven client of `benchmarks.http_client`. Run the coroutines with
`run()` (uvloop when installed: less CPU per request) or in any running loop.

Every request ends as a response (any status) or one transport error:
"connect", "write", "read", or "timeout" (no full response `timeout_s` after the
intended send time). Each result also holds `by_target` ({target name:
LoadResult dict}) and `rate_rps` there is the target's share of the offered rate.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from benchmarks.http_client import CONNECT, READ, WRITE, ConnectionPool
from benchmarks.load import LoadResult, count_2xx, summarize

__all__ = ["Target", "arrival_times", "choose_targets", "closed_loop", "open_loop", "open_loop_records", "run", "step_arrival_times",
           "step_load"]

T = TypeVar("T")
_clock = time.perf_counter  # loop.time() is only good to 1 ms on uvloop
_TIMEOUT = 4
_ERRORS = {0: "", CONNECT: "connect", WRITE: "write", READ: "read", _TIMEOUT: "timeout"}
# Loop timers fire up to ~1 ms off either way: a request due within this of a wake-up goes out then, and its
# latency counts from that actual send (below its intended time) so that sending early never shortens it.
_EARLY_S = 0.0005


@dataclass(frozen=True)
class Target:
    """One kind of request. `weight`: its relative share of the requests; `name` defaults to `path`.

    Host and Content-Length are set by the client (those in `headers` are ignored).
    `method` may be any whose answer carries a body framed by length or chunks (not HEAD).
    """

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    name: str = ""
    method: str = "POST"

    @property
    def label(self) -> str:
        return self.name or self.path

    def request_bytes(self, host: str, port: int) -> bytes:
        """The whole HTTP/1.1 request, built once and written as is for every send."""
        head = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(self.body)}"]
        head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in ("host", "content-length")]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def _check_targets(targets: Sequence[Target]) -> None:
    if not targets:
        raise ValueError("no targets: give at least one Target")
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"target names must be unique, got {labels}: set Target(name=...)")
    bad = [t.label for t in targets if not (math.isfinite(t.weight) and t.weight > 0)]
    if bad:
        raise ValueError(f"target weights must be finite and > 0; bad: {bad}")


def _arrivals(rng: np.random.Generator, rate_rps: float, duration_s: float, arrivals: str) -> np.ndarray:
    if not (math.isfinite(rate_rps) and rate_rps > 0 and duration_s > 0):
        raise ValueError(f"rate_rps and duration_s must be > 0, got {rate_rps} and {duration_s}")
    if arrivals == "constant":
        return np.arange(math.ceil(rate_rps * duration_s - 1e-9)) / rate_rps
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be 'poisson' or 'constant', got {arrivals!r}")
    expected = rate_rps * duration_s
    gaps = rng.exponential(1.0 / rate_rps, size=int(expected + 6 * math.sqrt(expected) + 16))
    times = np.cumsum(gaps)
    while times[-1] < duration_s:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate_rps, size=len(gaps)))])
    return times[times < duration_s]


def arrival_times(rate_rps: float, duration_s: float, arrivals: str = "poisson", seed: int = 0) -> np.ndarray:
    """Send offsets in seconds from the start, in [0, duration_s), sorted.

    "constant": k / rate_rps exactly. "poisson": a Poisson process (exponential
    gaps with mean 1 / rate_rps), reproducible for a given seed.
    """
    return _arrivals(np.random.default_rng(seed), rate_rps, duration_s, arrivals)


def step_arrival_times(rates_rps: Sequence[float], step_s: float, arrivals: str = "poisson",
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, step index of each) for one schedule whose rate is rates_rps[k] during [k*step_s, (k+1)*step_s)."""
    rng = np.random.default_rng(seed)
    parts = [k * step_s + _arrivals(rng, rate, step_s, arrivals) for k, rate in enumerate(rates_rps)]
    steps = [np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)]
    return np.concatenate(parts or [np.zeros(0)]), np.concatenate(steps or [np.zeros(0, dtype=np.int64)])


def choose_targets(weights: Sequence[float], n: int, seed: int = 0) -> np.ndarray:
    """n target indices drawn with probability proportional to weights (seeded, independent of arrivals)."""
    return _draw(np.random.default_rng([seed, 1]), weights, n)


def _draw(rng: np.random.Generator, weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 1:
        return np.zeros(n, dtype=np.int64)
    return rng.choice(len(w), size=n, p=w / w.sum())


class _Run:
    """One run's requests (ids in order of intended send) and their fates, sent through a ConnectionPool.

    No task, future or object per request: columns of plain lists, callbacks, one
    timer for all timeouts. A wake-up costs more CPU than a request, so an
    open-loop schedule also sends what is due whenever an answer wakes the loop.
    """

    def __init__(self, host: str, port: int, targets: Sequence[Target], max_connections: int, timeout_s: float,
                 due: list[float] | None = None, picks: list[int] | None = None):
        if max_connections < 1 or not timeout_s > 0:
            raise ValueError(f"need max_connections >= 1 and timeout_s > 0, got {max_connections}, {timeout_s}")
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.requests = [t.request_bytes(host, port) for t in targets]
        self.pool = ConnectionPool(host, port, max_connections, self._finish)
        # target, intended send (clock s), latency base (intended, or the send if that was early), tag
        # (schedule index, or closed-loop worker), status (0: none yet), error index, latency s
        due, picks = due or [], picks or []
        n = self._scheduled = len(due)
        self.target, self.intended, self.base, self.tag = picks, due, list(due), list(range(n))
        self.status, self.error, self.latency = [0] * n, [0] * n, [math.nan] * n
        self.pending = 0  # requests sent, not yet finished
        self.sources = 1 if n else 0  # schedules or workers still sending
        self.on_finish: Callable[[int, int], object] | None = None  # (request id, error index)
        self.done = self.loop.create_future()
        self._next = 0  # the schedule's next request to send
        self._tick: asyncio.TimerHandle | None = self.loop.call_later(due[0] - _clock(), self._on_tick) if n else None
        self._swept = 0  # requests before this one are all finished
        self._timer: asyncio.TimerHandle | None = None

    def add(self, target: int, now: float, tag: int) -> None:
        """Send one request now (closed loop)."""
        columns = (self.target, self.intended, self.base, self.tag, self.status, self.error, self.latency)
        for column, value in zip(columns, (target, now, now, tag, 0, 0, math.nan)):
            column.append(value)
        self._send(len(self.status) - 1)

    def _send(self, rid: int) -> None:
        self.pending += 1
        if self._timer is None:
            self._arm(rid)
        self.pool.send(rid, self.requests[self.target[rid]])

    def _pump(self, now: float) -> None:
        """Send every scheduled request due by now + _EARLY_S (however late the loop woke); re-arm the tick."""
        due, n, horizon = self.intended, self._scheduled, now + _EARLY_S
        while (i := self._next) < n and due[i] <= horizon:
            self._next = i + 1  # before sending: a send can finish a request, which pumps again
            if due[i] > now:
                self.base[i] = now
            self._send(i)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._next < n:
            self._tick = self.loop.call_later(due[self._next] - now, self._on_tick)
        elif self.sources:
            self.sources = 0
            self.check_done()

    def _on_tick(self) -> None:
        self._tick = None
        try:
            self._pump(_clock())
        except Exception as exc:  # noqa: BLE001 - lost in a callback, it would hang the run: end it
            self.fail(exc)

    def _finish(self, rid: int, status: int, error: int) -> None:
        try:
            if self.status[rid] or self.error[rid]:
                return  # timed out already
            now = _clock()
            if not error and now >= self.intended[rid] + self.timeout_s:
                error = _TIMEOUT  # answered past its deadline, before the sweep's timer ran: late all the same
            if error:
                self.error[rid] = error
            else:
                self.status[rid] = status
                self.latency[rid] = now - self.base[rid]
            self.pending -= 1
            if self.on_finish is not None:
                self.on_finish(rid, error)
            if self._next < self._scheduled:
                if self.intended[self._next] <= now + _EARLY_S:
                    self._pump(now)
            elif not self.pending:
                self.check_done()
        except Exception as exc:  # noqa: BLE001 - ends the run, see _on_tick
            self.fail(exc)

    def _arm(self, rid: int) -> None:
        # timers fire up to ~1 ms early (uvloop): never sooner than 1 ms, so an early one cannot spin
        delay = self.intended[rid] + self.timeout_s - _clock()
        self._timer = self.loop.call_later(max(delay, 0.001), self._sweep)

    def _sweep(self) -> None:
        """Time out every request in flight timeout_s after its intended send; re-arm for the oldest left."""
        try:
            self._timer = None
            now, status, error, intended = _clock(), self.status, self.error, self.intended
            i, n, expired = self._swept, self._next if self._scheduled else len(status), []
            while i < n and (status[i] or error[i] or intended[i] + self.timeout_s <= now):
                if not (status[i] or error[i]):
                    error[i] = _TIMEOUT
                    expired.append(i)
                i += 1
            self._swept = i
            if expired:
                self.pending -= len(expired)
                self.pool.cancel(expired)
                for rid in expired if self.on_finish is not None else ():
                    self.on_finish(rid, _TIMEOUT)
            if self._timer is None and i < n:
                self._arm(i)
            self.check_done()
        except Exception as exc:  # noqa: BLE001 - ends the run, see _on_tick
            self.fail(exc)

    def check_done(self) -> None:
        if not self.pending and not self.sources and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    async def wait(self) -> None:
        """Until every request has finished; then close the connections."""
        self.check_done()
        try:
            await self.done
        finally:
            for timer in filter(None, (self._tick, self._timer)):
                timer.cancel()
            await self.pool.aclose()

    def records(self, origin: float) -> np.ndarray:
        """Rows (target, intended s from origin, status, latency s, error index, tag)."""
        columns = (self.target, self.intended, self.status, self.latency, self.error, self.tag)
        records = np.array(columns, dtype=np.float64).reshape(6, -1).T.copy()
        records[:, 1] -= origin
        return records


def _result(records: np.ndarray, targets: Sequence[Target], mode: str, connections: int | None,
            rate_rps: float | None, duration_s: float, per_target: bool = True) -> LoadResult:
    """Summarize record rows (target, intended, status, latency s, error index, ...) into a LoadResult."""
    ok = records[:, 4] == 0
    codes, counts = np.unique(records[ok, 2].astype(np.int64), return_counts=True)
    statuses = {str(c): int(n) for c, n in zip(codes, counts)}
    kinds, kind_counts = np.unique(records[~ok, 4].astype(np.int64), return_counts=True)
    total_weight = sum(t.weight for t in targets)
    by_target = {}
    if per_target:
        for k, t in enumerate(targets):
            share = None if rate_rps is None else rate_rps * t.weight / total_weight
            by_target[t.label] = _result(records[records[:, 0] == k], targets, mode, connections, share,
                                         duration_s, per_target=False).to_dict()
    return LoadResult(
        tool="asyncio", mode=mode, connections=connections,
        rate_rps=None if rate_rps is None else float(rate_rps), duration_s=float(duration_s),
        requests=int(ok.sum()), throughput_rps=count_2xx(statuses) / duration_s if duration_s > 0 else 0.0,
        latency_ms=summarize(records[ok, 3] * 1e9), statuses=statuses,
        errors={_ERRORS[k]: int(n) for k, n in zip(kinds, kind_counts)}, by_target=by_target,
        latency_2xx_ms=summarize(records[ok & (records[:, 2] >= 200) & (records[:, 2] < 300), 3] * 1e9),
    )


async def _run_schedule(host: str, port: int, targets: Sequence[Target], offsets: np.ndarray, seed: int,
                        max_connections: int, timeout_s: float) -> np.ndarray:
    """Send at start + offsets; return the records, intended times relative to start."""
    picks = choose_targets([t.weight for t in targets], len(offsets), seed).tolist()
    start = _clock() + 0.005
    load = _Run(host, port, targets, max_connections, timeout_s, (start + offsets).tolist(), picks)
    await load.wait()
    return load.records(start)


async def open_loop(host: str, port: int, targets: Sequence[Target], rate_rps: float, duration_s: float,
                    arrivals: str = "poisson", seed: int = 0, max_connections: int = 256,
                    timeout_s: float = 10.0) -> LoadResult:
    """Offer rate_rps requests/s for duration_s; latency counts from each request's intended send time.

    arrivals: "poisson" (exponential gaps) or "constant" (1 / rate_rps apart);
    seed fixes both the schedule and the choice of target. At most
    max_connections are opened; a request due while all are busy waits for one,
    and the wait is part of its latency. Requests still in flight when the
    schedule ends are waited for, each until timeout_s after its intended send.
    duration_s of the result runs from the first scheduled send to the later of
    the schedule's end and the last response.
    """
    _check_targets(targets)
    offsets = arrival_times(rate_rps, duration_s, arrivals, seed)
    records = await _run_schedule(host, port, targets, offsets, seed, max_connections, timeout_s)
    return _result(records, targets, "open", None, rate_rps, _span(records, 0.0, duration_s))


async def open_loop_records(host: str, port: int, targets: Sequence[Target], rate_rps: float, duration_s: float,
                            arrivals: str = "poisson", seed: int = 0, max_connections: int = 256,
                            timeout_s: float = 10.0) -> tuple[np.ndarray, LoadResult]:
    """`open_loop`, plus each request's record: rows of (target, intended send s from the start, status,
    latency s, error kind (0: none), tag) — for figures over time, such as recovery after a fault."""
    _check_targets(targets)
    offsets = arrival_times(rate_rps, duration_s, arrivals, seed)
    records = await _run_schedule(host, port, targets, offsets, seed, max_connections, timeout_s)
    return records, _result(records, targets, "open", None, rate_rps, _span(records, 0.0, duration_s))


async def step_load(host: str, port: int, targets: Sequence[Target], rates: list[float], step_s: float,
                    arrivals: str = "poisson", seed: int = 0, max_connections: int = 256,
                    timeout_s: float = 10.0) -> list[LoadResult]:
    """One open-loop run (as `open_loop`) whose rate is rates[k] during step k; one LoadResult per step.

    The schedule and the connection pool are continuous across steps; a step's
    result holds the requests whose intended send time falls in it, and its
    duration_s is step_s, or more if its last response came after the step ended.
    """
    _check_targets(targets)
    offsets, step_of = step_arrival_times(rates, step_s, arrivals, seed)
    records = await _run_schedule(host, port, targets, offsets, seed, max_connections, timeout_s)
    step_index = step_of[records[:, 5].astype(np.int64)]
    results = []
    for k, rate in enumerate(rates):
        mine = records[step_index == k]
        results.append(_result(mine, targets, "open", None, rate, _span(mine, k * step_s, step_s)))
    return results


def _span(records: np.ndarray, start_s: float, window_s: float) -> float:
    """window_s, or longer if a response (intended + latency) came after start_s + window_s."""
    done = records[records[:, 4] == 0]
    last = float(np.max(done[:, 1] + done[:, 3])) if len(done) else 0.0
    return max(window_s, last - start_s)


async def closed_loop(host: str, port: int, targets: Sequence[Target], connections: int, duration_s: float,
                      timeout_s: float = 10.0, seed: int = 0) -> LoadResult:
    """`connections` workers, each sending its next request as soon as the previous one ended, for duration_s.

    Requests in flight at the end are waited for; duration_s of the result is the
    wall time until the last one ended. A worker whose connect failed waits 50 ms
    before retrying, so a dead server yields connect errors, not a busy loop.
    """
    _check_targets(targets)
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    load = _Run(host, port, targets, connections, timeout_s)
    weights = [t.weight for t in targets]
    rngs = [np.random.default_rng([seed, 2, k]) for k in range(connections)]
    picks: list[list[int]] = [[] for _ in range(connections)]
    start = _clock()
    end = start + duration_s

    def issue(k: int) -> None:
        try:
            now = _clock()
            if now >= end:
                load.sources -= 1
                load.check_done()
                return
            if not picks[k]:
                picks[k] = _draw(rngs[k], weights, 1024).tolist()
            load.add(picks[k].pop(), now, k)
        except Exception as exc:  # noqa: BLE001 - ends the run, see _Run._on_tick
            load.fail(exc)

    def finished(rid: int, error: int) -> None:
        if error == CONNECT:
            load.loop.call_later(0.05, issue, load.tag[rid])
        else:
            issue(load.tag[rid])

    load.on_finish = finished
    load.sources = connections
    for k in range(connections):
        issue(k)
    await load.wait()
    return _result(load.records(start), targets, "closed", connections, None, _clock() - start)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a load coroutine (`open_loop(...)`, ...) to completion in a new event loop, and return its result.

    The loop is uvloop's when it is installed: its callbacks and socket I/O take
    about a quarter less CPU per request than asyncio's own loop, which matters
    when the generator shares the machine with the server it measures. The
    async functions also run in any running loop, at that higher cost.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
