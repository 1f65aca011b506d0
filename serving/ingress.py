"""The ingress deployment: HTTP and gRPC in, batches out to the models, statistics to the monitor.

Serve runs one or more replicas of it. Each replica either runs fleet's own
HTTP listener on the public port (`serving.http_server`, the default) or is
reached through Serve's HAProxy/proxy. Each keeps its own batchers and
statistics and pushes the statistics to the monitor about once a second.

A model runs either in its own worker deployment (split mode: one
DeploymentHandle call per batch) or inside this replica (colocated mode: the
batch runs on a local thread, no Ray call) — `workers[name]` is a handle or None.
Either way the model's versions follow the repository (serving/versions.py);
the routes learn of a switch from the status refresh, at once for a colocated model.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from serving.autoscale import LOAD_METRIC
from serving.batching import batch_deadline_ns
from serving.errors import DeadlineExceeded, FleetError, ModelUnavailable
from serving.http_api import build_handler, build_http_app
from serving import heap
from serving.http_server import HttpListener
from serving.telemetry.logs import configure_logging
from serving.metrics import StatsRecorder
from serving.monitoring.predlog import PredictionLog
from serving.options import ServingOptions
from serving.registry import ModelRepository
from serving.rollout.state import Route
from serving.service import InferenceService
from serving.telemetry.tracing import compute_traceparent, setup_tracing, shutdown_tracing
from serving.workers import LocalWorkerClient, ModelRunner

__all__ = ["Ingress", "HandleWorkerClient", "FailedWorkerClient", "replica_gone", "retry_budget_s"]

_log = logging.getLogger("fleet.ingress")

_EARLY_PUSH_S = 0.05  # at most one early push (a candidate's failure) per this long
# The native gRPC transport's counters (`NativeGrpcListener.stats`) the monitor adds up and exports.
GRPC_TRANSPORT_COUNTERS = ("connections_refused", "connections_failed", "calls_refused", "calls_cancelled",
                           "replies_dropped")


class HandleWorkerClient:
    """A model's worker reached through its Serve DeploymentHandle: one call per batch.

    A batch whose replica died under it (the process killed, its node lost) is sent
    once more: Serve routes the second call to a live replica, and inference is
    idempotent. The retry waits at most until the batch's deadline (a monotonic-ns
    instant, 0: none; by default the batcher's `batch_deadline_ns`) or `retry_timeout_s`,
    whichever comes first. An error the
    model raised (a FleetError) is never retried.
    """

    def __init__(self, handle, *, retry_timeout_s: float = 10.0):
        self._infer = handle.infer
        self._status = handle.status
        self._handle = handle
        self.retry_timeout_s = retry_timeout_s
        self.retries = 0  # batches sent again after their replica went away

    async def infer(self, version: int, inputs: dict, deadline_ns: int = 0) -> dict:
        try:
            return await self._call(version, inputs)
        except Exception as exc:
            if not replica_gone(exc):
                raise _unwrap(exc) from exc
            first = exc
        deadline_ns = deadline_ns or batch_deadline_ns.get()
        budget_s = retry_budget_s(time.monotonic_ns(), deadline_ns, self.retry_timeout_s)
        if budget_s <= 0:
            raise _unwrap(first) from first
        self.retries += 1
        _log.warning("a worker replica went away during a batch (%s); sending it once more", type(first).__name__)
        try:
            return await asyncio.wait_for(self._call(version, inputs), budget_s)
        except asyncio.TimeoutError:
            if deadline_ns and time.monotonic_ns() >= deadline_ns:
                raise DeadlineExceeded("the model's worker replica went away and the retry ran out of time") from first
            raise ModelUnavailable(f"the model's worker replica went away and no other answered within "
                                   f"{budget_s:.1f} s; retry", retry_after_s=1.0) from first
        except Exception as exc:
            raise _unwrap(exc) from exc

    async def _call(self, version: int, inputs: dict) -> dict:
        traceparent = compute_traceparent()  # the batch's `compute` span when it is traced: the worker's parent
        if traceparent is None:
            return await self._infer.remote(version, inputs)
        return await self._infer.remote(version, inputs, traceparent=traceparent)

    async def status(self) -> dict:
        try:
            return await self._status.remote()
        except Exception as exc:
            raise _unwrap(exc) from exc

    async def sync(self) -> dict:
        """One worker replica follows the repository now (the others at their next poll)."""
        try:
            return await self._handle.sync.remote()
        except Exception as exc:
            raise _unwrap(exc) from exc


class FailedWorkerClient:
    """A colocated model that could not load: reported not ready, answered 503."""

    def __init__(self, error: str):
        self.error = error

    async def infer(self, version: int, inputs: dict) -> dict:
        raise ModelUnavailable(f"the model failed to load: {self.error}")

    async def status(self) -> dict:
        return {"versions": [], "error": self.error}


# What a DeploymentHandle call raises when the replica it went to is gone (ActorDiedError and
# ActorUnavailableError are RayActorErrors; Serve raises ReplicaUnavailableError for a replica
# it had picked that left), as opposed to an error of the model's own.
_REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


def replica_gone(exc: BaseException) -> bool:
    """True when `exc` says the worker replica died or became unreachable: the call may go again."""
    if isinstance(exc, RayTaskError):
        exc = exc.cause  # a task error is the model's, unless what it wraps is a dead actor
    return isinstance(exc, _REPLICA_GONE) and not isinstance(exc, FleetError)


def retry_budget_s(now_ns: int, deadline_ns: int, retry_timeout_s: float) -> float:
    """How long a retried call may take: up to the deadline (monotonic ns, 0: none), at most `retry_timeout_s`."""
    if not deadline_ns:
        return retry_timeout_s
    return min(retry_timeout_s, (deadline_ns - now_ns) / 1e9)


def _unwrap(exc: Exception) -> Exception:
    """A worker's FleetError as it was raised; a dead or unreachable worker as ModelUnavailable."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, FleetError):
        return exc.cause
    if replica_gone(exc):
        return ModelUnavailable(f"the model's worker is unavailable ({type(exc).__name__}); retry",
                                retry_after_s=1.0)
    return exc


@serve.ingress()
class Ingress:
    """Serve ingress deployment class (options set by `serving.app`)."""

    async def __init__(self, options: dict, workers: dict):
        self.options = ServingOptions(**options)
        o = self.options
        # fleet's loggers at INFO in this replica's log (text or JSON lines), and its tracing: before the
        # service, which takes the tracing it finds (serving/telemetry/logs.py, serving/telemetry/tracing.py).
        configure_logging(o.log_format)
        setup_tracing(o.tracing_sample_ratio, o.otlp_endpoint, o.trace_dir, component="ingress")
        repository = ModelRepository(self.options.repository)
        clients = await asyncio.gather(*(self._client(name, handle) for name, handle in workers.items()))
        models = {name: (*repository.load_config(name), client) for name, client in zip(workers, clients)}
        self.replica_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.recorder = StatsRecorder()
        self._monitor = None
        # The prediction log: a bounded buffer and a writer thread of this replica (serving/monitoring/predlog.py).
        self.log = None if not o.data_dir else PredictionLog(
            o.data_dir, uuid.uuid4().hex[:8], flush_rows=o.log_flush_rows, flush_interval_s=o.log_flush_interval_s,
            max_rows=o.log_buffer_rows, max_bytes=o.log_buffer_bytes)
        self.service = InferenceService(
            models, self.options, self.recorder, stats_source=self._stats, metrics_source=self._metrics,
            log=self.log, monitor_source=self._report, rollout_source=self._rollout,
        )
        await self._wait_for_workers()
        for name, client in zip(workers, clients):
            if isinstance(client, LocalWorkerClient):
                # The switch is announced at once: the next request without a version goes to the new one.
                client.runner.start_polling(self.options.version_poll_interval_s,
                                            functools.partial(self.service.refresh, models=(name,)))
        self._early_push: asyncio.Task | None = None
        self._early_push_at = 0.0
        self.service.on_candidate_error = self._push_soon
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._push_loop()), loop.create_task(self._refresh_loop())]
        self.listener = self.grpc = None
        self._grpc_pushed: dict[str, int] = {}  # the transport's counters as of the last push that arrived
        host = self.options.listen_host
        if host == "node":  # this replica's node's own address (each node of a cluster: its own)
            import ray

            host = ray.util.get_node_ip_address()
        if self.options.listen_port:
            self.listener = HttpListener(
                build_handler(self.service), host, self.options.listen_port,
                max_body_bytes=self.options.max_request_bytes, graceful_shutdown_s=self.options.drain_timeout_s,
                max_connections=self.options.max_connections,
            )
            await self.listener.start()
        if self.options.grpc_port:
            from serving.grpc.server import make_grpc_listener

            self.grpc = make_grpc_listener(self.service, host, self.options.grpc_port,
                                           transport=self.options.grpc_transport,
                                           max_message_bytes=self.options.max_request_bytes,
                                           max_concurrent_rpcs=self.options.max_connections,
                                           graceful_shutdown_s=self.options.drain_timeout_s)
            await self.grpc.start()
        heap.settle()  # what start-up made out of the collector's reach; young collections less often

    async def _client(self, name: str, handle):
        if handle is not None:
            return HandleWorkerClient(handle, retry_timeout_s=self.options.worker_retry_timeout_s)
        try:
            runner = await ModelRunner.load(self.options.repository, name, self.options.worker_threads,
                                            retire_grace_s=self.options.version_retire_grace_s)
            return LocalWorkerClient(runner)
        except Exception as exc:  # noqa: BLE001 - one broken model must not take the others down
            _log.error("model %s failed to load in this replica: %s", name, exc)
            return FailedWorkerClient(f"{type(exc).__name__}: {exc}")

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler cannot see the requests on this replica's own sockets: report them
        (serving/autoscale.py; called by Serve only when the deployment autoscales)."""
        load = self.listener.in_flight() if self.listener is not None else 0
        return {LOAD_METRIC: float(load + (self.grpc.in_flight() if self.grpc is not None else 0))}

    def check_health(self) -> None:
        """Serve's health check: a replica whose listener died is replaced."""
        if self.listener is not None and not self.listener.alive():
            raise RuntimeError("the HTTP listener of this ingress replica has stopped")
        if self.grpc is not None and not self.grpc.alive():
            raise RuntimeError("the gRPC listener of this ingress replica has stopped")

    async def _wait_for_workers(self) -> None:
        """Wait for the models still loading; one whose backend answered "down" (Triton unreachable) is not
        waited for: the replica starts, reports it not ready, and the status refresh sees it come back."""
        deadline = asyncio.get_running_loop().time() + self.options.startup_timeout_s
        while True:
            await self.service.refresh(timeout_s=10.0)
            settled = all(s.ready or s.backend_error for s in self.service.models.values())
            if self.service.is_ready() or settled or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        for name, state in self.service.models.items():
            if not state.ready:
                _log.warning("model %s is not ready: %s", name, state.error or state.backend_error)

    # -- the control plane: aggregated, never per request -------------------------
    def _monitor_actor(self):
        if self._monitor is None:
            from serving.monitor import get_monitor

            self._monitor = get_monitor(self.options.to_dict())
        return self._monitor

    async def _push(self) -> None:
        self.service.monitoring.flush_counts()  # the drift counts of the rows kept since the last push
        delta = self.recorder.take()
        monitoring = self.recorder.take_monitoring()
        log_counts = self.log.take_counts() if self.log is not None else {}
        monitoring["log"] = log_counts
        monitoring["log_buffered"] = self.log.buffered_rows if self.log is not None else 0
        evidence = monitoring["rollout"] = self.service.evidence.take()
        grpc_now = self.grpc.stats() if self.grpc is not None and hasattr(self.grpc, "stats") else None
        if grpc_now:  # what grew since the last push that arrived
            monitoring["grpc"] = {k: grpc_now[k] - self._grpc_pushed.get(k, 0) for k in GRPC_TRANSPORT_COUNTERS}
        try:
            routes = await self._monitor_actor().push.remote(self.replica_id, delta, self.service.queue_depths(),
                                                             self.service.breaker_states(), monitoring)
        except Exception as exc:  # monitor restarting: keep the delta for the next push
            self.recorder.give_back(delta)
            self.recorder.give_back_monitoring(monitoring)
            self.service.evidence.give_back(evidence)
            if self.log is not None:
                self.log.give_back_counts(log_counts)
            self._monitor = None
            _log.warning("could not push statistics to the monitor: %s", exc)
            return
        if grpc_now:
            self._grpc_pushed = grpc_now
        # The rollout controller answers with every model's route: a rollback reaches this replica here.
        for model, route in (routes or {}).items():
            self.service.apply_route(model, Route.from_dict(route))

    def _push_soon(self) -> None:
        """A request failed on a candidate: hand the evidence to the controller now, not at the next interval."""
        now = time.monotonic()
        if self._early_push is None or (self._early_push.done() and now - self._early_push_at >= _EARLY_PUSH_S):
            self._early_push_at = now
            self._early_push = asyncio.get_running_loop().create_task(self._push())

    async def _push_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.metrics_push_interval_s)
            await self._push()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.status_refresh_interval_s)
            await self.service.refresh()

    async def _stats(self) -> dict:
        await self._push()  # this replica's latest counts are in the answer
        return await self._monitor_actor().totals.remote()

    async def _metrics(self) -> bytes:
        await self._push()
        return await self._monitor_actor().render.remote()

    async def _report(self, kind: str, model: str, version: str | None) -> dict:
        """The monitor's drift or quality report of `model` (this replica's latest counts pushed first)."""
        await self._push()
        return await self._monitor_actor().report.remote(kind, model, version)

    async def _rollout(self, model: str, action: str | None, version: int | None, by: str, **start) -> dict:
        """The controller's rollout state of `model`, after `action` if one is given (serving/rollout/api.py)."""
        monitor = self._monitor_actor()
        try:
            if action is None:
                return await monitor.rollout_status.remote(model)
            return await monitor.rollout_action.remote(model, action, version, by, **start)
        except RayTaskError as exc:
            if isinstance(exc.cause, FleetError):
                raise exc.cause from None
            raise

    async def __del__(self):
        # Drain: stop taking connections, let the requests in flight finish, then stop.
        # Both listeners drain at once: neither waits for the other's calls to finish.
        await asyncio.gather(*(listener.stop() for listener in (getattr(self, "listener", None),
                                                                getattr(self, "grpc", None)) if listener is not None))
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if hasattr(self, "service"):
            await self.service.close(drain_timeout_s=self.options.drain_timeout_s)
            if getattr(self, "log", None) is not None:
                # Every accepted row is written before the replica goes (what cannot be is counted as dropped).
                await asyncio.to_thread(self.log.close, self.options.drain_timeout_s + 20.0)
            await self._push()
            for state in self.service.models.values():
                close = getattr(state.worker, "close", None)
                if close is not None:
                    await close()
        await asyncio.to_thread(shutdown_tracing)  # the spans still queued go out
