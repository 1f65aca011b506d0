"""The ingress side of a rollout: which version answers a request, and the stable version's second chance.

A mixin of `serving.service.InferenceService` (kept apart so the service stays about
models, batchers and answers): it uses the service's `models`, `monitoring`, `recorder`,
`evidence` and `_submit`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from serving.batching import Batcher
from serving.errors import DeadlineExceeded, FleetError
from serving.monitoring.observe import answered_by_fallback
from serving.rollout.routing import routing_key, to_candidate
from serving.rollout.state import Route

__all__ = ["RolloutRouting"]

_SHADOW_MAX_INFLIGHT = 64  # shadow copies of one model in flight per ingress replica; more are shed
_SHADOW_TIMEOUT_US = 2_000_000  # a copy waits at most this long in the candidate's queue
# Shadow copies go to a batcher of their own for the candidate: one batch in flight, each copy waiting up to
# this long for company even when nothing runs. Fewer, fuller executions than one per copy: less of the
# replica's CPU taken from the stable path (the client never waits for a copy).
_SHADOW_BATCH_DELAY_US = 20_000


class RolloutRouting:
    """Routing by the model's `Route` (see the module docstring)."""

    _shadow_inflight: dict
    _shadow_batchers: dict  # (model, version) -> the batcher of its shadow copies
    _joint: dict  # model -> ((stable, candidate), the batcher both run on) while the canary splits its traffic

    def apply_route(self, model: str, route: Route) -> bool:
        """Route `model`'s requests by `route` from now on, if it is newer than the one followed (by epoch).

        Sources: the worker's status (rollout.json as the worker last read it) and the controller's
        answer to every statistics push (a rollback arrives that way within a push interval).
        """
        state = self.models.get(model)
        if state is None or (state.route is not None and route.epoch <= state.route.epoch):
            return False
        state.route = route
        return True

    @staticmethod
    def _in_rollout(state, version: str | None) -> bool:
        """Whether a request is routed by the model's rollout: it names no version, and a candidate this replica
        has loaded is in play (only these requests are the rollout's evidence: a replica still loading the
        candidate sends everything to stable, which would bias the split)."""
        route = state.route
        return (not version and route is not None and route.candidate is not None
                and route.candidate in state.versions and (route.weight > 0.0 or route.shadow_share > 0.0))

    async def _dispatch(self, state, number: int, routed: bool, checked, request, header: str | None,
                        key_id: str | None, start: int, start_mono: int) -> tuple:
        """(result, who answered if not the model, the version that answered, the request id) of a request
        for `number` (`routed`: `_in_rollout`, so the rollout picks the version)."""
        request_id, route, shadow = request.id, state.route, None
        if routed:
            number, request_id, shadow = self._route(state, route, number, request, header, key_id)
        request_id, meta = self.monitoring.request_meta(state.spec, number, request_id, key_id, start_mono)
        if routed and route.candidate == number:
            result, answered_by, number = await self._on_candidate(state, route, number, checked, request, meta,
                                                                   start)
            return result, answered_by, number, request_id
        try:
            result, answered_by = await self._submit(state, number, checked.inputs, checked.rows,
                                                     request.timeout_us, meta)
        except FleetError as exc:
            if shadow is not None and exc.status >= 500:
                self._shadow(state, route, checked, None, meta)
            raise
        if shadow is not None and answered_by is None:
            self._shadow(state, route, checked, result.outputs, meta)
        return result, answered_by, number, request_id

    def _joint_batcher(self, state, number: int) -> tuple[Batcher, int] | None:
        """(the batcher, the lane) that runs `number` while the model's canary splits its traffic, else None.

        Stable and candidate share one queue and its batches (one lane each): two versions cost the
        model executions of one, where a batcher each would send the candidate's few requests alone,
        between the stable's batches. A batcher of a rollout that ended is drained and closed.
        """
        name = state.spec.name
        route, joint = state.route, self._joint.get(name)
        pair = None
        if route is not None and route.weight > 0.0 and route.candidate is not None:
            pair = (route.stable, route.candidate)
            if route.stable not in state.versions or route.candidate not in state.versions:
                pair = None
        if joint is not None and joint[0] != pair:
            self._retire_joint(name)
            joint = None
        if pair is None or number not in pair:
            return None
        if joint is None:
            stable, candidate = self._batcher(state, pair[0]), self._batcher(state, pair[1])
            # A batch carries an execution of each version: half as many batches in flight keep the model
            # executions in flight where stable alone had them, and each version's batches as full.
            inflight = max(1, stable.config.max_inflight_batches // 2)
            config = dataclasses.replace(stable.config, max_inflight_batches=inflight)
            batcher = stable.sibling(f"{name}:{pair[0]}+{pair[1]}", config)
            batcher.add_lane(candidate.lanes[0])
            runner = getattr(state.worker, "infer_many", None)
            if runner is not None and state.breaker is None:  # both lanes' rows in one call to the worker
                batcher.execute_lanes = lambda batches, done: runner([(pair[lane], x) for lane, x in batches], done)
            joint = self._joint[name] = (pair, batcher)
        return joint[1], joint[0].index(number)

    def _retire_joint(self, model: str) -> None:
        joint = self._joint.pop(model, None)
        if joint is not None:
            self._close_later(joint[1])

    def _route(self, state, route: Route, stable: int, request, header: str | None,
               key_id: str | None) -> tuple[int, str | None, str | None]:
        """(the version that answers, the request id, the routing key if the request is also to be shadowed).

        The candidate answers when the routing key falls under its weight; in shadow mode a copy goes to it
        when the key falls under the shadow share. A request with no key of its own gets its id now, so
        the id it is answered with is the one it was routed by.
        """
        request_id = request.id
        key = routing_key(request.parameters, header, key_id, request_id)
        if key is None:
            key = request_id = self.monitoring.new_request_id()
        if route.weight > 0.0:
            return (route.candidate if to_candidate(key, route.weight) else stable), request_id, None
        return stable, request_id, key if to_candidate(key, route.shadow_share) else None

    def _shadow(self, state, route: Route, checked, stable_outputs: dict | None, meta) -> None:
        """Copy an answered (or failed: `stable_outputs` None) request to the candidate, after the client's answer.

        The client never waits for it or sees its answer; a candidate with `_SHADOW_MAX_INFLIGHT` copies
        in flight in this replica gets no more (counted as shed), so a slow one cannot pile work up. A copy
        is queued on the candidate's shadow batcher by a callback once this task step is over (the client's
        answer is written first), and its answer paired with stable's by a callback: no task of its own.
        """
        name = state.spec.name
        inflight = self._shadow_inflight.get(name, 0)
        if inflight >= _SHADOW_MAX_INFLIGHT:
            self.evidence.shadow_shed(name)
            return
        self._shadow_inflight[name] = inflight + 1
        if meta is not None:  # logged under the candidate, answered_by "shadow of <stable>": a pair by request id
            meta = answered_by_fallback(meta, f"shadow of {route.stable}", None, None)
        output = state.spec.outputs[0].name
        stable = None if stable_outputs is None else stable_outputs.get(output)
        # Queued once this task step is over: the client's answer is written first.
        asyncio.get_running_loop().call_soon(self._send_shadow, state, route.candidate, checked, stable, output, meta)

    def _send_shadow(self, state, candidate: int, checked, stable, output: str, meta) -> None:
        name = state.spec.name
        try:
            future = self._enqueue_to(self._shadow_batcher(state, candidate), checked.inputs, checked.rows,
                                      _SHADOW_TIMEOUT_US, meta)
        except Exception:  # noqa: BLE001 - refused by the candidate: evidence against it, never the client's error
            self._shadow_inflight[name] -= 1
            self.evidence.shadow_pair(name, stable, None)
            return
        future.add_done_callback(lambda f: self._shadow_done(name, stable, output, f))

    def _shadow_done(self, name: str, stable, output: str, future: asyncio.Future) -> None:
        self._shadow_inflight[name] -= 1
        answer = None
        if not future.cancelled() and future.exception() is None:
            answer = future.result().outputs.get(output)
        self.evidence.shadow_pair(name, stable, answer)

    def _shadow_batcher(self, state, version: int) -> Batcher:
        key = (state.spec.name, version)
        batcher = self._shadow_batchers.get(key)
        if batcher is None:
            main = self._batcher(state, version)
            config = dataclasses.replace(main.config, max_inflight_batches=1, max_queue_delay_us=_SHADOW_BATCH_DELAY_US,
                                         preferred_batch_sizes=(), latency_target_ms=0.0, hold=True,
                                         default_timeout_us=0, allow_timeout_override=True)
            batcher = self._shadow_batchers[key] = main.sibling(f"{main.name}:shadow", config)
        return batcher

    def _drop_shadow_batcher(self, model: str, version: int) -> Batcher | None:
        """The version left this replica: its shadow batcher, to close (None if it had none)."""
        return self._shadow_batchers.pop((model, version), None)

    async def _on_candidate(self, state, route: Route, number: int, checked, request, meta,
                            start: int) -> tuple:
        """Run a request on the candidate; if it fails there, once more on the stable version within its timeout."""
        name = state.spec.name
        try:
            result, answered_by = await self._submit(state, number, checked.inputs, checked.rows,
                                                     request.timeout_us, meta)
            return result, answered_by, number
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the candidate's is evidence against it
            self.recorder.failure(name, str(number), type(exc).__name__, time.perf_counter_ns() - start)
            self.evidence.failure(name, number)
            if self.on_candidate_error is not None:
                self.on_candidate_error()
            stable = route.stable
            if stable is None or stable not in state.versions:
                raise
        timeout_us = request.timeout_us
        if timeout_us:
            timeout_us -= (time.perf_counter_ns() - start) // 1000
            if timeout_us <= 0:
                raise DeadlineExceeded(f"model {name!r}: the candidate version {number} failed and no time was "
                                       f"left to answer with the stable version {stable}")
        result, answered_by = await self._submit(state, stable, checked.inputs, checked.rows, timeout_us, meta)
        return result, answered_by, stable

