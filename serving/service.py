"""The inference service behind the HTTP routes: models, versions, batchers, statistics.

Transport-agnostic: the HTTP layer hands it bytes and gets bytes back; workers
are reached through `WorkerClient` (a Serve DeploymentHandle in the cluster).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Protocol

from google.protobuf import json_format

import native
from serving.adaptive import DEFAULT_MAX_UTILIZATION
from serving.batching import Batcher, BatcherConfig, BatchResult
from serving.breaker import CLOSED, CircuitBreaker
from serving.cache import ResponseCache, cache_key
from serving.errors import BackendError, FleetError, InvalidInput, ModelNotFound, ModelUnavailable, RepositoryError
from serving.fallback import Fallback, breaker_config, check_fallbacks, wants_breaker
from serving.limits import RequestLimits
from serving.telemetry.logs import log_fields
from serving.metrics import StatsRecorder
from serving.model_config import (
    LATENCY_TARGET_PARAM, MAX_INFLIGHT_PARAM, MAX_UTILIZATION_PARAM, ModelConfig, ModelSpec, is_decimal,
)
from serving.monitoring.answers import MonitoringAnswers
from serving.monitoring.observe import answered_by_fallback
from serving.monitoring.replica import ReplicaMonitoring
from serving.options import ServingOptions
from serving.preprocess import Preprocessor, make_preprocessor
from serving.protocol import InferRequest, decode_request, encode_response
from serving.registry import ModelRepository, check_model_name
from serving.rollout.evidence import RolloutEvidence
from serving.rollout.serving import RolloutRouting
from serving.rollout.state import Route
from serving.telemetry.tracing import Trace, active as active_tracing
from serving.validation import validate_request

__all__ = ["WorkerClient", "ModelState", "InferenceService", "SERVER_NAME", "SERVER_VERSION", "parse_header_length"]

_log = logging.getLogger("fleet.service")
_ERROR_LOGS_PER_S = 20

SERVER_NAME = "fleet"
try:
    SERVER_VERSION = importlib.metadata.version("fleet")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    SERVER_VERSION = "0+unknown"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration", "model_repository", "metrics"]


class WorkerClient(Protocol):
    """How the ingress reaches a model's worker: one call per batch. A client may also offer
    `infer_many(batches, done)` (`serving.workers.ModelRunner.infer_many`): a canary's batch holding
    several versions' rows in one call."""

    async def infer(self, version: int, inputs: dict) -> dict: ...

    async def status(self) -> dict: ...


@dataclass
class ModelState:
    spec: ModelSpec
    config: ModelConfig
    worker: WorkerClient
    versions: list[int] = field(default_factory=list)  # loaded on the worker
    backend: dict = field(default_factory=dict)
    error: str | None = None  # why the worker is not ready, if it is not
    batchers: dict[int, Batcher] = field(default_factory=dict)
    status_asked: int = 0  # status questions sent to the worker, and the latest one whose answer applies:
    status_applied: int = 0  # an older answer arriving after a newer one must not undo a switch
    breaker: CircuitBreaker | None = None  # guards a remote backend (serving/fallback.py)
    fallback: Fallback | None = None  # answers while the backend cannot
    backend_error: str | None = None  # why the backend cannot answer now (the worker's health check)
    unloaded: bool = False  # by an administrator (serving/admin.py): answered 503, ignored by server readiness
    route: Route | None = None  # the model's rollout (serving/rollout/): stable, candidate and its weight

    @property
    def ready(self) -> bool:
        # A model whose backend is down still answers, through its fallback.
        down = self.backend_error is not None and self.fallback is None
        return bool(self.versions) and self.error is None and not down and not self.unloaded


class InferenceService(RolloutRouting, MonitoringAnswers):
    """Everything an ingress replica answers, minus HTTP."""

    def __init__(
        self,
        models: dict[str, tuple[ModelSpec, ModelConfig, WorkerClient]],
        options: ServingOptions,
        recorder: StatsRecorder | None = None,
        stats_source: Callable[[], Awaitable[dict]] | None = None,
        metrics_source: Callable[[], Awaitable[bytes]] | None = None,
        log=None,
        monitor_source: Callable[[str, str, str | None], Awaitable[dict]] | None = None,
        rollout_source: Callable[..., Awaitable[dict]] | None = None,
    ):
        self.options = options
        self._limits = RequestLimits.from_options(options)
        self.models = {name: ModelState(spec, config, worker) for name, (spec, config, worker) in models.items()}
        fallbacks = check_fallbacks({name: state.spec for name, state in self.models.items()})
        for name, state in self.models.items():
            state.fallback = fallbacks.get(name)
            if wants_breaker(state.spec):
                state.breaker = CircuitBreaker(name, breaker_config(state.spec))
        self.recorder = recorder or StatsRecorder()
        self.tracing = active_tracing()  # this process's tracing (serving/telemetry/), None when off: the front
        # ends start a request's trace with it
        # The response cache (serving/cache.py) of the models whose config enables it; None: no cache at all.
        self.cache = ResponseCache(options.response_cache_bytes) if options.response_cache_bytes > 0 else None
        if self.cache is not None:
            self.recorder.track_cache(self.cache)
        self._stats_source = stats_source
        self._metrics_source = metrics_source
        self._monitor_source = monitor_source  # the monitor's drift and quality reports
        self._rollout_source = rollout_source  # the rollout controller's status and actions
        # Request ids, the prediction log (`log`: a serving.monitoring.predlog.PredictionLog) and drift counts.
        self.monitoring = ReplicaMonitoring(options.repository, self.recorder, log, options.data_dir,
                                            max_feedback_labels=options.max_feedback_labels,
                                            max_string_bytes=options.max_string_bytes)
        self._repository: ModelRepository | None = None
        self._preprocessors: dict[tuple[str, int], Preprocessor | None] = {}
        self._draining: set[asyncio.Task] = set()  # batchers of versions no longer served, finishing their queue
        self._unready_refresh: asyncio.Future | None = None  # one at a time, shared by concurrent probes
        self.evidence = RolloutEvidence()  # per version in a rollout, for the judge (pushed with the statistics)
        self._shadow_inflight: dict[str, int] = {}  # shadow copies in flight per model (serving/rollout/serving.py)
        self._shadow_batchers: dict[tuple[str, int], Batcher] = {}
        self._joint: dict[str, tuple[tuple[int, int], Batcher]] = {}  # a canary's stable and candidate, one queue
        self.on_candidate_error: Callable[[], None] | None = None  # the replica pushes early: a fast rollback
        self._error_log_window, self._error_logs, self._error_logs_skipped = 0.0, 0, 0  # `_log_error`'s budget

    def _preprocessor(self, state: ModelState, version: int) -> Preprocessor | None:
        """The version's preprocessing (config.pbtxt parameters, statistics from its metadata.json), built once."""
        key = (state.spec.name, version)
        if key not in self._preprocessors:
            metadata = None
            try:
                if state.spec.parameters.get("preprocess") == "standardize":
                    if self._repository is None:
                        self._repository = ModelRepository(self.options.repository)
                    metadata = self._repository.metadata(state.spec.name, version)
                self._preprocessors[key] = make_preprocessor(
                    state.spec, metadata, source=f"{state.spec.name}/{version}")
            except RepositoryError as exc:
                raise ModelUnavailable(f"model {state.spec.name!r} version {version} cannot serve: {exc}") from exc
        return self._preprocessors[key]

    # -- model state -----------------------------------------------------------
    async def refresh(self, timeout_s: float = 5.0, models: Iterable[str] | None = None) -> None:
        """Ask every worker (or those of `models`) which versions it serves: one call per model."""

        async def one(state: ModelState) -> None:
            state.status_asked += 1
            asked = state.status_asked
            try:
                status = await asyncio.wait_for(state.worker.status(), timeout_s)
            except Exception as exc:  # worker restarting or failed to load
                state.error = f"{type(exc).__name__}: {exc}"
                return
            if asked < state.status_applied:
                return  # a question asked later (the refresh right after a switch) was answered first
            state.status_applied = asked
            versions = sorted(status.get("versions", []))
            if versions != state.versions:
                self._switch(state, versions)
            if status.get("rollout"):
                self.apply_route(state.spec.name, Route.from_dict(status["rollout"]))
            route = state.route
            if route is not None and route.candidate is not None:
                error = status.get("load_errors", {}).get(str(route.candidate))
                if error is not None:  # the controller rolls a candidate back that cannot load
                    self.evidence.load_failed(state.spec.name, route.candidate, error)
            state.backend = status.get("backend", {})
            state.error = status.get("error")
            state.backend_error = status.get("backend_error")
            state.unloaded = bool(status.get("unloaded", False))

        states = self.models.values() if models is None else [self.models[name] for name in models]
        await asyncio.gather(*(one(s) for s in states))

    async def refresh_unready(self, timeout_s: float = 2.0) -> None:
        """Ask the workers of the models that are not ready now once more, before a readiness answer.

        Each ingress replica refreshes on its own timer (status_refresh_interval_s), so without this a
        replica that has not yet heard that a backend came up answers 503 while its neighbour on the
        same port answers 200. Costs nothing while every model is ready; concurrent probes share one
        refresh.
        """
        names = [name for name, s in self.models.items() if not s.ready and not s.unloaded]
        if not names:
            return
        if self._unready_refresh is None or self._unready_refresh.done():
            self._unready_refresh = asyncio.ensure_future(self.refresh(timeout_s, names))
        await asyncio.shield(self._unready_refresh)

    def _switch(self, state: ModelState, versions: list[int]) -> None:
        """Route to `versions` from now on; the batchers of versions that left drain, then close.

        Requests without a version go to the newest one. A request already queued
        on a version that left still runs on it (the worker keeps it loaded for
        its retire grace); a new one naming that version is refused (404).
        """
        gone = [v for v in state.versions if v not in versions]
        new = [v for v in versions if v not in state.versions]
        state.versions = versions
        _log.debug("model %s: routing to versions %s (new %s, gone %s)", state.spec.name, versions, new, gone)
        joint = self._joint.get(state.spec.name)
        if joint is not None and any(v in gone for v in joint[0]):
            self._retire_joint(state.spec.name)
        for version in gone:
            if self.cache is not None:  # its answers can never be asked for again: free them
                self.cache.invalidate(state.spec.name, version)
            self._preprocessors.pop((state.spec.name, version), None)
            self.monitoring.forget(state.spec.name, version)
            for batcher in (state.batchers.pop(version, None), self._drop_shadow_batcher(state.spec.name, version)):
                if batcher is not None:
                    self._close_later(batcher)
        for version in new:
            try:  # read the version's metadata now, not on its first request
                self._preprocessor(state, version)
            except Exception:  # noqa: BLE001 - its requests say why; the refresh must go on
                pass

    def _close_later(self, batcher: Batcher) -> None:
        """Let a batcher no longer used finish its queue (up to the drain timeout), then close it."""
        task = asyncio.get_running_loop().create_task(batcher.close(drain_timeout_s=self.options.drain_timeout_s))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _model(self, name: str) -> ModelState:
        check_model_name(name)
        state = self.models.get(name)
        if state is None:
            raise ModelNotFound(f"unknown model {name!r}; served models: {sorted(self.models)}")
        return state

    def _version(self, state: ModelState, version: str | None) -> int:
        if state.unloaded:
            raise ModelUnavailable(f"model {state.spec.name!r} was unloaded by an administrator; it answers again "
                                   "once an administrator loads it")
        if version is None or version == "":
            if not state.versions:
                raise ModelUnavailable(f"model {state.spec.name!r} is not ready: {state.error or 'loading'}")
            route = state.route
            if route is not None and route.stable in state.versions:
                return route.stable  # during a rollout the candidate is chosen per request (`_route`)
            return state.versions[-1]
        if not is_decimal(version):
            raise ModelNotFound(f"model version must be a positive integer, got {version!r}")
        number = int(version)
        if number not in state.versions:
            raise ModelNotFound(
                f"model {state.spec.name!r} has no version {number} being served; served versions: {state.versions}"
            )
        return number

    def _batcher(self, state: ModelState, version: int) -> Batcher:
        batcher = state.batchers.get(version)
        if batcher is None:
            spec = state.spec
            policy = spec.batching
            inflight = int(spec.parameters.get(MAX_INFLIGHT_PARAM, self.options.max_inflight_batches))
            config = BatcherConfig(
                max_batch_size=spec.max_batch_size,
                max_queue_delay_us=policy.max_queue_delay_us if policy.enabled else 0,
                preferred_batch_sizes=policy.preferred_batch_sizes if policy.enabled else (),
                max_queue_size=policy.queue.max_queue_size or self.options.max_queue_size,
                # The server's default where the config sets none; a request's own timeout may shorten either.
                default_timeout_us=policy.queue.default_timeout_us or round(self.options.default_timeout_ms * 1000),
                allow_timeout_override=policy.queue.allow_timeout_override,
                max_inflight_batches=max(1, inflight),
                latency_target_ms=float(spec.parameters.get(LATENCY_TARGET_PARAM, 0)) if policy.enabled else 0.0,
                adaptive_max_utilization=float(spec.parameters.get(MAX_UTILIZATION_PARAM, DEFAULT_MAX_UTILIZATION)),
            )
            worker, name, tag = state.worker, spec.name, str(version)
            recorder = self.recorder
            breaker = state.breaker

            async def execute(inputs: dict) -> dict:
                if breaker is None:
                    return await worker.infer(version, inputs)
                if not breaker.allow():  # open: the dead backend sees nothing, the requests go to the fallback
                    raise ModelUnavailable(f"model {name!r}: {breaker.describe()}",
                                           retry_after_s=max(1.0, breaker.retry_after_s))
                try:
                    outputs = await worker.infer(version, inputs)
                except ModelNotFound:
                    raise  # the version left: not the backend's failure
                except Exception as exc:
                    breaker.failure(str(exc))
                    raise
                breaker.success()
                return outputs

            def on_batch(rows: int, requests: int, compute_ns: int, ok: bool) -> None:
                recorder.batch(name, tag, rows, compute_ns, ok)

            pre = self._preprocessor(state, version)
            observe = self.monitoring.observer(spec, version, pre)  # drift counts and the prediction log
            if getattr(pre, "contract", None) is not None:
                pre.on_violations = lambda counts: recorder.violations(name, counts)
            batcher = state.batchers[version] = Batcher(f"{name}:{version}", execute, config, on_batch, pre, observe)
        return batcher

    def breaker_states(self) -> dict[str, int]:
        """{model: 1 if its circuit breaker is open or probing, 0 if closed} for the models that have one."""
        return {name: int(s.breaker.state != CLOSED) for name, s in self.models.items() if s.breaker is not None}

    def queue_depths(self) -> dict[tuple[str, str], int]:
        depths = {
            (name, str(v)): b.queue_depth for name, state in self.models.items() for v, b in state.batchers.items()
        }
        for name, (pair, batcher) in self._joint.items():  # a canary's queue: under its stable version
            key = (name, str(pair[0]))
            depths[key] = depths.get(key, 0) + batcher.queue_depth
        return depths

    # -- answers ---------------------------------------------------------------
    def server_metadata(self) -> dict:
        # `native_kernels` (fleet's): which preprocessing kernels this replica runs, "native" or "numpy".
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS,
                "native_kernels": native.BACKEND}

    def is_ready(self) -> bool:
        """Every model ready, but those an administrator unloaded (they are not meant to answer)."""
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the server is not ready (the first model that is not, but those an administrator unloaded, and
        why), None when it is."""
        for name, state in self.models.items():
            if not state.ready and not state.unloaded:
                why = state.error or state.backend_error or ("no version loaded" if not state.versions else "not ready")
                return f"model {name!r}: {why}"
        return None

    def model_ready(self, model: str, version: str | None = None) -> bool:
        state = self._model(model)
        try:
            self._version(state, version)
        except FleetError:
            return False
        return state.ready

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        state = self._model(model)
        spec = state.spec
        versions = [str(v) for v in state.versions]
        if version is not None:
            versions = [str(self._version(state, version))]
        return {
            "name": spec.name,
            "versions": versions,
            "platform": spec.platform or spec.backend,
            "inputs": [t.metadata(spec.max_batch_size) for t in spec.inputs],
            "outputs": [t.metadata(spec.max_batch_size) for t in spec.outputs],
        }

    def model_config(self, model: str) -> dict:
        """The config as Triton's `GET /v2/models/{m}/config` returns it (JSON of ModelConfig)."""
        state = self._model(model)
        doc = json_format.MessageToDict(state.config, preserving_proto_field_name=True)
        doc.setdefault("name", state.spec.name)
        return doc

    def repository_index(self) -> list[dict]:
        out = []
        for name, state in sorted(self.models.items()):
            for v in state.versions or [None]:
                entry = {"name": name, "state": "READY" if state.ready else "UNAVAILABLE"}
                if v is not None:
                    entry["version"] = str(v)
                if state.unloaded:
                    entry["reason"] = "unloaded by an administrator"
                elif not state.ready:
                    entry["reason"] = state.error or state.backend_error or "loading"
                elif state.breaker is not None and state.breaker.state != CLOSED:
                    # fleet's: a model whose breaker is open says so (per ingress replica), and who answers.
                    answered = f"answered by {state.fallback.model}" if state.fallback else "refused with 503"
                    entry["reason"] = f"{state.breaker.describe()}; {answered}"
                out.append(entry)
        return out

    async def infer(
        self, model: str, version: str | None, body: bytes, header_length: int | None, key_id: str | None = None,
        routing_header: str | None = None, trace: Trace | None = None,
    ) -> tuple[bytes, int | None, str | None]:
        """An HTTP request body in, the answer's body out (see `answer`).

        Returns (body, json header length or None, "<model>/<version>" of the fallback that
        answered, None when the model itself did).
        """
        limits = self._limits
        (payload, json_length), answered_by = await self.answer(
            model, version, lambda: decode_request(body, header_length, limits), _encode_http, key_id,
            routing_header, trace)
        return payload, json_length, answered_by

    async def answer(self, model: str, version: str | None, decode: Callable[[], InferRequest],
                     encode: Callable[[str, str, list, str | None], object], key_id: str | None = None,
                     routing_header: str | None = None, trace: Trace | None = None) -> tuple[object, str | None]:
        """Decode, validate, batch, execute, encode: every front end's inference (HTTP and gRPC).

        `decode()` reads the request (its front end's format) into an `InferRequest`; it runs only
        once the model's queue has admitted the request, so overload costs little. `encode(model,
        version, outputs, request_id)` turns the answer into the front end's format, `outputs` being
        (name, datatype, array, binary) tuples. Returns (what `encode` returned, "<model>/<version>"
        of the fallback that answered, None when the model itself did). `key_id` names the
        caller's API key in the prediction log (a digest prefix, never the key). During a rollout
        a request that names no version goes to the candidate or the stable version by its routing
        key (`routing_header`, serving/rollout/routing.py); one that failed on the candidate is
        answered by the stable version, so the client sees no error of the candidate's. `trace`: the
        request's trace (`Tracing.start_request`, None: not traced), its parse and encode spans added here.
        """
        start = time.perf_counter_ns()
        start_mono = time.monotonic_ns()
        tag, request_id, error = (version or ""), None, None
        try:
            state = self._model(model)
            number = self._version(state, version)
        except FleetError as exc:
            self._log_error(exc, model, tag, None, trace)
            if trace is not None:
                trace.finish(exc, model=model, version=tag)
            raise
        tag = str(number)
        routed = self._in_rollout(state, version)  # its outcome is evidence for the judge
        try:
            joint = self._joint.get(model) if routed else None
            queued = joint[1] if joint is not None else state.batchers.get(number)
            if queued is not None:
                queued.admit()  # a full queue refuses before the body is parsed: overload costs little
            request = decode()
            request_id = request.id
            checked = validate_request(request, state.spec, max_elements=self.options.max_tensor_elements,
                                       max_batch_rows=self.options.max_batch_rows)
            if trace is not None:
                trace.add("parse", start_mono)
            key = None
            # A request the rollout routes is never answered from the cache: the judge needs real answers.
            if self.cache is not None and state.spec.response_cache and not routed:
                key = cache_key(model, number, request, [ospec.name for ospec, _ in checked.outputs])
                hit = self.cache.get(key, model, number)
                if hit is not None:
                    return self._from_cache(state, number, request, checked, hit, encode, key_id, start,
                                            start_mono), None
            result, answered_by, number, request_id = await self._dispatch(
                state, number, routed, checked, request, routing_header, key_id, start, start_mono)
            tag = str(number)
            outputs = []
            for ospec, binary in checked.outputs:
                arr = result.outputs.get(ospec.name)
                if arr is None:
                    raise ModelUnavailable(f"model {model!r} returned no output {ospec.name!r}")
                outputs.append((ospec.name, ospec.datatype, arr, binary))
            encode_ns = time.monotonic_ns()
            response = encode(model, tag, outputs, request_id)
            if trace is not None:
                trace.add("encode", encode_ns)
            if key is not None and answered_by is None:  # only the model's own successful answers
                self.cache.put(key, [o[:3] for o in outputs], model, number)
        except FleetError as exc:
            error = exc
            self._log_error(exc, model, tag, request_id, trace)
            self.recorder.failure(model, tag, type(exc).__name__, time.perf_counter_ns() - start)
            if routed and exc.status >= 500:
                self.evidence.failure(model, int(tag))
            raise
        except asyncio.CancelledError:
            error = "cancelled"
            self.recorder.failure(model, tag, "Cancelled", time.perf_counter_ns() - start)
            raise
        finally:
            if trace is not None:
                trace.finish(error, model=model, version=tag, request_id=request_id)
            # The exception's traceback holds this frame: a reference back to it from here would make a cycle
            # that keeps the request (its body) alive until the collector finds it (serving/heap.py).
            error = None
        elapsed = time.perf_counter_ns() - start
        self.recorder.success(model, tag, elapsed, result.queue_ns, result.compute_ns)
        if routed and answered_by is None:
            self.evidence.success(model, number, elapsed / 1e9, result.outputs.get(state.spec.outputs[0].name))
        return response, answered_by

    def _log_error(self, exc: FleetError, model: str, version: str, request_id: str | None, trace) -> None:
        """One log line per refused or failed request, with its id, trace id, model and version: at most
        `_ERROR_LOGS_PER_S` a second per replica (a flood of bad requests must not become a flood of log
        writes); the next line says how many were left out."""
        now = time.monotonic()
        if now - self._error_log_window >= 1.0:
            self._error_log_window, self._error_logs = now, 0
        self._error_logs += 1
        if self._error_logs > _ERROR_LOGS_PER_S:
            self._error_logs_skipped += 1
            return
        skipped, self._error_logs_skipped = self._error_logs_skipped, 0
        _log.info("request answered %d: %s%s", exc.status, exc.message,
                  f" ({skipped} more error lines left out before this one)" if skipped else "",
                  extra=log_fields(request_id=request_id, trace=trace, model=model, version=version or None,
                                   event="error"))

    def _from_cache(self, state: ModelState, number: int, request: InferRequest, checked, hit, encode,
                    key_id: str | None, start: int, start_mono: int):
        """Answer a request from the response cache: counted as a success (with no queue or compute time, as
        Triton counts a hit), written to the prediction log flagged `answered_by` "cache", and counted in the
        version's drift windows and live feature histograms as its batch would have been."""
        stored = {name: arr for name, _, arr in hit}
        outputs = [(ospec.name, ospec.datatype, stored[ospec.name], binary) for ospec, binary in checked.outputs]
        request_id, meta = self.monitoring.request_meta(state.spec, number, request.id, key_id, start_mono)
        response = encode(state.spec.name, str(number), outputs, request_id)
        self.monitoring.log_cached(state.spec, number, meta, checked.inputs, stored, start_mono)
        batcher = state.batchers.get(number)  # the one that computed the stored answer
        if batcher is not None and hasattr(batcher.lanes[0].observe, "count_cached"):  # drift sees hits too
            batcher.lanes[0].observe.count_cached(checked.inputs, stored, batcher.lanes[0].preprocess)
        self.recorder.success(state.spec.name, str(number), time.perf_counter_ns() - start, 0, 0)
        return response

    async def _submit(self, state: ModelState, number: int, inputs: dict, rows: int,
                      timeout_us: int | None, meta=None) -> tuple[BatchResult, str | None]:
        """Batch the request on the model, or on its fallback while the model's backend cannot answer."""
        breaker = state.breaker
        if breaker is None or breaker.would_allow():
            try:
                return await self._batcher_submit(state, number, inputs, rows, timeout_us, meta), None
            except (ModelUnavailable, BackendError):
                if state.fallback is None:
                    raise
        elif state.fallback is None:
            raise ModelUnavailable(f"model {state.spec.name!r} cannot answer now: {breaker.describe()}; retry",
                                   retry_after_s=max(1.0, breaker.retry_after_s))
        fallback = self._model(state.fallback.model)
        version = self._version(fallback, None if state.fallback.version is None else str(state.fallback.version))
        if meta is not None:  # logged under the model asked for, answered by its fallback
            meta = answered_by_fallback(meta, f"fallback {fallback.spec.name}/{version}", state.spec.name, number)
        result = await self._batcher_submit(fallback, version, inputs, rows, timeout_us, meta)
        return result, f"{fallback.spec.name}/{version}"

    async def _batcher_submit(self, state: ModelState, number: int, inputs: dict, rows: int,
                              timeout_us: int | None, meta=None) -> BatchResult:
        joint = self._joint_batcher(state, number) if state.route is not None else None
        if joint is not None:
            return await self._enqueue_to(joint[0], inputs, rows, timeout_us, meta, joint[1])
        return await self._enqueue_to(self._batcher(state, number), inputs, rows, timeout_us, meta)

    @staticmethod
    def _enqueue_to(batcher: Batcher, inputs: dict, rows: int, timeout_us: int | None, meta=None,
                    lane: int = 0) -> asyncio.Future:
        """Check the request against the lane's preprocessing, then queue it there: the future of its
        `BatchResult` (`Batcher.enqueue`; awaiting it is `submit`)."""
        pre = batcher.lanes[lane].preprocess
        if pre is not None:
            pre.check(inputs[pre.input_name])
        return batcher.enqueue(inputs, rows, timeout_us=timeout_us, meta=meta, lane=lane)

    async def rollout_call(self, model: str, action: str | None, version: int | None = None,
                           by: str = "admin", **start) -> dict:
        """The rollout controller's state of `model` (action None) or the state after `action`."""
        if self._rollout_source is None:
            raise ModelUnavailable("the rollout controller is not reachable from this replica")
        return await self._rollout_source(model, action, version, by, **start)

    async def metrics(self) -> bytes:
        if self._metrics_source is None:
            raise ModelUnavailable("metrics are not available on this replica")
        return await self._metrics_source()

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        batchers = [b for s in self.models.values() for b in s.batchers.values()]
        batchers += self._shadow_batchers.values()
        batchers += [batcher for _, batcher in self._joint.values()]
        await asyncio.gather(*(b.close(drain_timeout_s=drain_timeout_s) for b in batchers), *self._draining)


def _encode_http(model: str, version: str, outputs: list, request_id: str | None) -> tuple[bytes, int | None]:
    return encode_response(model, version, outputs, request_id=request_id)


def parse_header_length(value: str | None) -> int | None:
    """Inference-Header-Content-Length, validated."""
    if value is None:
        return None
    if value.isdigit() and value.isascii():  # the usual spelling, without stripping it first
        return int(value)
    if not is_decimal(value.strip()):
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}")
    return int(value)
