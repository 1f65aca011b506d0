"""How a batch the batcher sent runs (serving/batching.py): each lane's rows preprocessed, executed and answered.

`BatchExecution` is the `Batcher`'s half that runs what its scheduling loop sends: a batch's
requests grouped by lane (model version), each lane's preprocessing, one call to the model per
lane or one `execute_lanes` call for them all, each lane's requests answered from its own outputs
as soon as they are in, then observed (the prediction log and drift counts) off the answer path.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping

import numpy as np

from serving.backends.base import lone_request
from serving.errors import BackendError, FleetError, InvalidInput, ModelUnavailable
from serving.telemetry.tracing import batch_traceparent

if TYPE_CHECKING:
    from serving.preprocess import Preprocessor

__all__ = ["BatchExecution", "BatchResult", "Done", "Lane", "TOGETHER_S", "batch_deadline_ns", "side_by_side"]

_log = logging.getLogger("fleet.batching")

# While a batch executes: the latest deadline of its requests (monotonic ns; 0 when one of them has
# none), for an `execute` that may spend more time on it, such as a retry on another replica.
batch_deadline_ns: contextvars.ContextVar[int] = contextvars.ContextVar("fleet_batch_deadline_ns", default=0)

Arrays = Mapping[str, np.ndarray]
Execute = Callable[[dict[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
OnBatch = Callable[[int, int, int, bool], None]  # (rows, requests, compute_ns, ok)
# After a batch's answers are set: (its requests, the model's inputs, its outputs, sent_ns, compute_ns).
# The requests answered are those whose future holds a result; `_Pending.meta` is what `submit` was given.
Observe = Callable[[list, dict, Mapping, int, int], None]
# Lanes that finished together: [(i, outputs or the exception raised)], i indexing the lanes handed over.
Done = Callable[[list[tuple[int, object]]], None]
# Several lanes' inputs in one call, `Done` called as lanes finish: [(lane, inputs)], done -> None.
ExecuteLanes = Callable[[list[tuple[int, dict]], Done], Awaitable[None]]


@dataclass(frozen=True)
class Lane:
    """What one model version of a batcher runs (lanes: serving/batching.py's docstring)."""

    execute: Execute
    preprocess: "Preprocessor | None" = None
    observe: Observe | None = None
    on_batch: OnBatch | None = None


@dataclass(frozen=True)
class BatchResult:
    """One request's outputs and where its time went (nanoseconds)."""

    outputs: dict[str, np.ndarray]
    queue_ns: int
    compute_ns: int
    batch_rows: int


class _Pending:
    __slots__ = ("inputs", "rows", "signature", "future", "enqueued_ns", "deadline_ns", "meta", "flags", "lane",
                 "trace")

    def __init__(self, inputs: Arrays, rows: int, signature, future, enqueued_ns: int, deadline_ns: int,
                 meta=None, lane: int = 0, trace=None):
        self.inputs = inputs
        self.rows = rows
        self.signature = signature
        self.future = future
        self.enqueued_ns = enqueued_ns
        self.deadline_ns = deadline_ns
        self.meta = meta  # the caller's, handed to `observe` with the batch (the prediction log's context)
        self.flags = None  # what preprocessing noted of its rows without refusing them (input-contract warnings)
        self.lane = lane  # which of the batcher's lanes (model versions) runs it
        self.trace = trace  # its request's serving.telemetry.tracing.Trace when traced (tracing on), else None


class BatchExecution:
    """Running the batches a `Batcher` sends (mixed into it; uses its lanes, config, adaptive policy, tracing and
    slots)."""

    def _dispatch(self, batch: list[_Pending], now: int) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        if len(self.lanes) == 1 or all(p.lane == live[0].lane for p in live):
            groups = [(live[0].lane, live)]
        else:  # each lane's requests in queue order
            by_lane: dict[int, list[_Pending]] = {}
            for p in live:
                by_lane.setdefault(p.lane, []).append(p)
            groups = list(by_lane.items())
        # Since when the model has been idle (adaptive mode's held time); `now` if it is busy.
        idle_since = self._last_done_ns if self._inflight == 0 else now
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._execute_batch(live, groups, now, idle_since))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _inputs(self, part: list[_Pending], pre: "Preprocessor | None") -> dict[str, np.ndarray]:
        """The batch's inputs but the preprocessed one (its kernel assembles it when the batch runs)."""
        if self.config.max_batch_size and len(part) > 1:
            return {name: np.concatenate([p.inputs[name] for p in part]) for name in part[0].inputs
                    if pre is None or name != pre.input_name}
        return {name: arr for name, arr in part[0].inputs.items() if pre is None or name != pre.input_name}

    async def _preprocess(self, pre: "Preprocessor", batch: list[_Pending], inputs: dict[str, np.ndarray]) -> bool:
        """Assemble the preprocessed input into `inputs` and answer the requests it refuses.

        A refused request's rows still run with the batch (its answer is already sent); False
        when no request is left waiting.
        """
        parts = [p.inputs[pre.input_name] for p in batch]
        try:
            if pre.heavy:
                arr, errors = await asyncio.get_running_loop().run_in_executor(None, pre.assemble, parts)
            else:
                arr, errors = pre.assemble(parts)
        except (ValueError, TypeError) as exc:  # what check() let through: the whole batch's data is refused
            raise InvalidInput(f"model {self.name}: preprocessing refused the input: {exc}") from exc
        inputs[pre.input_name] = arr
        for p, error in zip(batch, errors):
            if error is None:
                continue
            if not isinstance(error, BaseException):
                p.flags = error  # served, with a note (serving.monitoring.contracts.RowFlags)
            elif not p.future.done():
                p.future.set_exception(error)
        return any(not p.future.done() for p in batch)

    async def _prepare(self, groups: list) -> list:
        """[(lane, requests, inputs)] of the lanes with a request left to run once preprocessed. One lane's
        refusal of its whole batch is raised when it is the only lane, else answered to that lane's requests."""
        ready = []
        for index, part in groups:
            pre = self.lanes[index].preprocess
            inputs = self._inputs(part, pre)
            try:
                if pre is not None and not await self._preprocess(pre, part, inputs):
                    continue  # every request of the lane was refused: nothing of it to run
            except FleetError as exc:
                if len(groups) == 1:
                    raise
                _fail(part, exc, self.name)
                continue
            ready.append((index, part, inputs))
        return ready

    async def _run_lanes(self, ready: list, done: Done) -> None:
        """Run each lane's rows; `done([(i, outputs or the exception raised)])` as lanes finish (so one lane's
        requests never wait for another's). With one lane its exception is raised instead."""
        if len(ready) == 1:
            index, _, inputs = ready[0]
            done([(0, await self.lanes[index].execute(inputs))])
        elif self.execute_lanes is not None:
            await self.execute_lanes([(index, inputs) for index, _, inputs in ready], done)
        else:
            await side_by_side([self.lanes[index].execute(inputs) for index, _, inputs in ready], done)

    async def _execute_batch(self, batch: list[_Pending], groups: list, sent_ns: int, idle_since_ns: int = 0) -> None:
        rows = sum(p.rows for p in batch)
        if len(batch) == 1:  # (this task's own context)
            lone_request.set(True)
        ready: list = []
        ok: set[int] = set()  # lanes answered
        start = time.monotonic_ns()

        def done(results: list) -> None:
            answered = []  # (request, its result) of every lane finished now
            observed = []  # `_observe_later`'s arguments of those lanes
            for i, outputs in results:
                index, part, inputs = ready[i]
                if isinstance(outputs, BaseException):
                    if len(ready) == 1:
                        raise outputs
                    _fail(part, outputs, self.name)
                    continue
                compute_ns = time.monotonic_ns() - start
                try:
                    answered += self._answers(part, outputs, sent_ns, compute_ns)
                except BackendError as exc:
                    if len(ready) == 1:
                        raise
                    _fail(part, exc, self.name)
                    continue
                ok.add(index)
                observed.append((index, part, inputs, outputs, sent_ns, compute_ns))
            if len(results) > 1:
                # Lanes that finished together are answered in queue order, not lane after lane: the
                # candidate's requests resume no later than the stable ones beside them (their latency
                # is the judge's evidence).
                answered.sort(key=lambda pair: pair[0].enqueued_ns)
            self._set(answered, sent_ns, idle_since_ns)
            for args in observed:
                self._observe_later(*args)

        traced = error = None  # the batch's span (serving/telemetry/tracing.py) when one of its requests is traced
        if self.tracing is not None:
            traced = self._trace_batch(batch, sent_ns, rows)
        try:
            ready = await self._prepare(groups)
            if traced is not None:
                traced.add("preprocess", start)
            if not ready:
                return  # every request of the batch was refused: nothing to run
            batch_deadline_ns.set(0 if any(not p.deadline_ns for p in batch) else max(p.deadline_ns for p in batch))
            if traced is None:
                await self._run_lanes(ready, done)
            else:  # the worker's spans continue `compute` across the Ray call (HandleWorkerClient passes it on)
                ids = traced.child_ids()
                batch_traceparent.set(ids)
                compute_start = time.monotonic_ns()
                await self._run_lanes(ready, done)
                traced.add("compute", compute_start, 0, ids[1])
            if self.adaptive is not None:
                # Service time, not time in flight: a batch sent while another ran started when that one ended.
                done_ns = time.monotonic_ns()
                self.adaptive.on_batch(rows, done_ns - max(start, self._last_done_ns))
                self._last_done_ns = done_ns
        except asyncio.CancelledError:
            error = "cancelled: the batcher is shutting down"
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(ModelUnavailable(f"model {self.name} is shutting down"))
            raise
        except Exception as exc:
            error = exc
            _fail(batch, exc, self.name)
        finally:
            if traced is not None:
                traced.finish(error)
            self._inflight -= 1
            if self._queue:
                self._ensure_loop()
                self._wake.set()
            else:
                # The loop may sleep with the "nothing can go" threshold of a full pipeline:
                # with a slot free again, the next arrival must wake it.
                self._wake_rows = 1
            elapsed = time.monotonic_ns() - start
            for index, part, _ in ready:
                on_batch = self.lanes[index].on_batch
                if on_batch is not None:
                    on_batch(sum(p.rows for p in part), len(part), elapsed, index in ok)

    def _trace_batch(self, batch: list[_Pending], sent_ns: int, rows: int):
        """The batch's `batch` span if one of its requests is traced (their `queue` spans end when it was sent),
        else None. Tracing is on: called once per batch, never per request when it is off."""
        traces = []
        for p in batch:
            if p.trace is not None:
                p.trace.add("queue", p.enqueued_ns, sent_ns)
                traces.append(p.trace)
        batch_traceparent.set(None)  # this task's context may be a copy of a traced batch's
        if not traces:
            return None
        return self.tracing.start_batch(traces, sent_ns, batcher=self.name, rows=rows, requests=len(batch))

    def _answers(self, part: list[_Pending], outputs: Mapping[str, np.ndarray], sent_ns: int,
                 compute_ns: int) -> list:
        """[(request, its result)] of one lane's requests from its outputs (BackendError if their shape does not fit)."""
        rows = sum(p.rows for p in part)
        batching = bool(self.config.max_batch_size)
        if batching:
            for name, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != rows:
                    raise BackendError(f"model {self.name} returned {name!r} with shape {list(arr.shape)} "
                                       f"for a batch of {rows} rows")
        answered = []
        offset = 0
        for p in part:
            if batching and len(part) > 1:
                answer = {name: arr[offset : offset + p.rows] for name, arr in outputs.items()}
            else:
                answer = dict(outputs)
            offset += p.rows
            answered.append((p, BatchResult(answer, sent_ns - p.enqueued_ns, compute_ns, rows)))
        return answered

    def _set(self, answered: list, sent_ns: int, idle_since_ns: int) -> None:
        """Set the results in the order given; the adaptive policy learns each request's latency."""
        done_ns = time.monotonic_ns()
        adaptive = self.adaptive
        for p, result in answered:
            if not p.future.done():
                p.future.set_result(result)
            if adaptive is not None:
                adaptive.on_latency(done_ns - p.enqueued_ns, max(0, sent_ns - max(p.enqueued_ns, idle_since_ns)))

    def _observe_later(self, index: int, part: list[_Pending], inputs: dict, outputs: Mapping[str, np.ndarray],
                       sent_ns: int, compute_ns: int) -> None:
        """Observe a lane's answered requests after the answers, and after the next batch is on its way (the
        finally of `_execute_batch` frees this slot first): the prediction log and the drift counts hold up
        neither."""
        observe = self.lanes[index].observe
        if observe is not None:
            self._observing += 1
            asyncio.get_running_loop().call_soon(self._observe, observe, part, inputs, outputs, sent_ns, compute_ns)

    def _observe(self, observe: Observe, batch: list, inputs: dict, outputs, sent_ns: int, compute_ns: int) -> None:
        try:
            observe(batch, inputs, outputs, sent_ns, compute_ns)
        except Exception:  # noqa: BLE001 - observing must never fail a batch
            _log.exception("model %s: observing a batch failed", self.name)
        finally:
            self._observing -= 1


# Versions of a mixed batch run side by side that finish within this of the first are answered together, in
# queue order: which lane a request is in must not decide when it is answered unless one version is really
# slower (see `side_by_side`). As long as the one hop of serving.workers may hold the first version's answers.
TOGETHER_S = 100e-6


async def side_by_side(calls: list[Awaitable], done: Done, together_s: float = TOGETHER_S) -> None:
    """Await `calls` concurrently; `done([(i, outputs or the exception raised)])` as they finish, those that
    finish within `together_s` of the first unreported one in the same call.

    They start in a random order, and close finishers are reported together: which version's requests
    are answered first must be chance, not the lane. Otherwise each batch's candidate requests are
    answered all before or all after its stable ones, and at saturation (large batches, two threads
    contending for the GIL) an identical candidate's latency differs from stable's batch by batch in
    clusters the judge's latency test takes for independent requests: it rolled identical copies back.
    A version slower by more than `together_s` is reported on its own: it never holds the other longer.
    """
    loop = asyncio.get_running_loop()
    held: list = []
    remaining = len(calls)
    timer: asyncio.TimerHandle | None = None

    def report() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        if held:
            finished = held[:]
            held.clear()
            done(finished)

    async def one(i: int, call: Awaitable) -> None:
        nonlocal remaining, timer
        try:
            outputs = await call
        except Exception as exc:  # noqa: BLE001 - one call's failure is its own, handed to `done`
            outputs = exc
        remaining -= 1
        held.append((i, outputs))
        if remaining == 0 or together_s <= 0:
            report()
        elif timer is None:
            timer = loop.call_later(together_s, report)

    order = list(range(len(calls)))
    random.shuffle(order)
    try:
        await asyncio.gather(*(one(i, calls[i]) for i in order))
    finally:
        if timer is not None:
            timer.cancel()


def _fail(batch: list[_Pending], exc: BaseException, name: str) -> None:
    """Answer the batch's waiting requests with `exc` (a backend's own exception as a BackendError).

    Without its traceback: the futures hold the exception, and a traceback through the batch's frames would
    hold the batch and its futures again, a cycle that kept every failed request (its body) alive until the
    collector ran (serving/heap.py). Each request's own traceback starts where it awaits its answer."""
    exc = exc.with_traceback(None)
    error = exc
    if not isinstance(exc, FleetError):
        error = BackendError(f"model {name} failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
    for p in batch:
        if not p.future.done():
            p.future.set_exception(error)
