"""Model execution: the versions a model serves, loaded on their backends.

`ModelRunner` loads the versions the model's version_policy selects among the
accepted ones, warms them up and runs whole batches (NumPy arrays in, NumPy
arrays out). It keeps following the repository (`serving.versions`): newly
published, accepted versions are loaded next to the served ones and switched to
in place, without a replica restart. It lives either in a worker replica
(`ModelWorker`, one Serve deployment per model, reached by one DeploymentHandle
call per batch) or, in colocated mode, in the ingress replica itself
(`LocalWorkerClient`: no Ray call at all). No HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
import os

from serving import heap
from serving.batch_exec import TOGETHER_S, Done, side_by_side
from serving.errors import ModelNotFound, ModelUnavailable
from serving.telemetry.logs import configure_logging
from serving.registry import ModelRepository
from serving.telemetry.tracing import setup_tracing, shutdown_tracing
from serving.versions import OnSwitch, ServedVersions

__all__ = ["ModelRunner", "ModelWorker", "LocalWorkerClient"]

_log = logging.getLogger("fleet.worker")

# A canary's versions run in one hop while each would wait at most this long (seconds) for the others' batches:
# see `infer_many`.
_ONE_HOP_MAX_S = TOGETHER_S


class ModelRunner:
    """One model's loaded versions. Build with `await ModelRunner.load(...)`."""

    def __init__(self, versions: ServedVersions):
        self.model = versions.model
        self.versions = versions

    @classmethod
    async def load(cls, repository: str, model: str, threads: int | None = None, *,
                   retire_grace_s: float = 15.0) -> "ModelRunner":
        """Load the served versions; raise if the model has none, or none of them loads."""
        repo = ModelRepository(repository)
        versions = ServedVersions(repo, model, repo.spec(model), threads=threads, retire_grace_s=retire_grace_s)
        await versions.sync()
        if not versions.served and versions.state.loaded:  # (an unloaded model starts with nothing loaded)
            await versions.close()
            if versions.last_error:
                raise ModelUnavailable(f"model {model!r}: no version could be loaded ({versions.last_error})")
            raise ModelNotFound(f"model {model!r} has no published, accepted version to serve in {repository}")
        return cls(versions)

    def start_polling(self, interval_s: float, on_switch: OnSwitch | None = None) -> None:
        """Follow the repository every `interval_s` (0: never); `on_switch` runs after each switch."""
        self.versions.on_switch = on_switch
        self.versions.start_polling(interval_s)

    async def infer(self, version: int, inputs: dict) -> dict:
        """Run one batch through `version`; arrays in, arrays out."""
        backend = self.versions.backends.get(version)
        if backend is None:
            backend = await self.versions.on_miss(version)
            if backend is None:
                raise ModelNotFound(f"model {self.model!r} version {version} is not loaded on this worker; "
                                    f"served versions: {list(self.versions.served)}")
        return await backend.infer(inputs)

    async def infer_many(self, batches: list[tuple[int, dict]], done: Done) -> None:
        """Batches of several versions (a canary's stable and candidate): `done([(i, outputs or the exception
        raised)])` as they finish.

        Versions whose batches all take a few tens of microseconds (a small model, where handing a batch to its
        thread costs as much as running it) run in one hop to one thread, answered together: each waits for the
        others' at most `_ONE_HOP_MAX_S` in all. Others run side by side (`side_by_side`): answered together when
        they finish within that bound of each other, else each as soon as it is done, so a slow candidate never
        holds the stable version's answers longer (nor the other way round)."""
        backends = [self.versions.backends.get(v) for v, _ in batches]
        kind = type(backends[0])
        run_many = getattr(kind, "run_many", None)
        if run_many is not None and all(type(b) is kind for b in backends):
            times = [b.run_s for b in backends]
            # In one hop each version waits for the others' batches: at most all of them but the quickest one.
            if sum(times) - min(times) <= _ONE_HOP_MAX_S:
                done(list(enumerate(await run_many([(b, inputs) for b, (_, inputs) in zip(backends, batches)]))))
                return
        await side_by_side([self.infer(version, inputs) for version, inputs in batches], done)

    async def status(self) -> dict:
        """Served versions and backend details, for readiness, the ingress's routing and `fleet status`.

        `backend_error` says why a served version's backend cannot answer now (a Triton
        server down); the ingress reports the model not ready then, or ready through its fallback.
        """
        any_backend = next(iter(self.versions.backends.values()), None)
        status = {
            "model": self.model,
            "versions": list(self.versions.served),
            "loaded": sorted(self.versions.backends),
            "backend": any_backend.describe() if any_backend else {},
            "pid": os.getpid(),
            "unloaded": not self.versions.state.loaded,  # by an administrator (serving.json)
            "pinned": None if self.versions.state.versions is None else list(self.versions.state.versions),
            # rollout.json as last read (a progressive model): the ingress routes by it
            "rollout": None if self.versions.rollout is None else self.versions.rollout.route.to_dict(),
            "load_errors": {str(v): e for v, e in self.versions.load_errors.items()},
        }
        checks = [b.health() for v, b in self.versions.backends.items() if v in self.versions.served]
        errors = [e for e in await asyncio.gather(*checks) if e]
        if errors:
            status["backend_error"] = errors[0]
        return status

    async def sync(self) -> dict:
        """Follow the repository now (an administrator just changed serving.json); the new status."""
        await self.versions.sync()
        return await self.status()

    async def close(self) -> None:
        await self.versions.close()


class ModelWorker:
    """Serve deployment class for split mode (wrapped with `serve.deployment` by `serving.app`)."""

    async def __init__(self, repository: str, model: str, threads: int | None = None, *,
                       version_poll_interval_s: float = 0.0, version_retire_grace_s: float = 15.0,
                       telemetry: dict | None = None):
        # `telemetry`: ServingOptions.telemetry(), this replica's logs and tracing.
        telemetry = telemetry or {}
        configure_logging(telemetry.get("log_format", "text"))
        self.tracing = setup_tracing(telemetry.get("tracing_sample_ratio", 0.0), telemetry.get("otlp_endpoint"),
                                     telemetry.get("trace_dir"), component=f"worker-{model}")
        self.runner = await ModelRunner.load(repository, model, threads, retire_grace_s=version_retire_grace_s)
        # The ingress learns of a switch from its periodic status refresh (status_refresh_interval_s).
        self.runner.start_polling(version_poll_interval_s)
        _log.info("model %s: worker replica serving versions %s", model, list(self.runner.versions.served),
                  extra={"model": model, "event": "worker_ready"})
        heap.settle()  # as in the ingress: what start-up made lives as long as the replica

    async def infer(self, version: int, inputs: dict, traceparent: str | None = None) -> dict:
        """One batch; `traceparent` (the ingress batch's `compute` span, when traced) parents this side's
        `execute` span across the Ray call."""
        if traceparent is None or self.tracing is None:
            return await self.runner.infer(version, inputs)
        span = self.tracing.start_remote(traceparent, "execute", model=self.runner.model, version=version)
        if span is None:
            return await self.runner.infer(version, inputs)
        try:
            outputs = await self.runner.infer(version, inputs)
        except BaseException as exc:
            span.finish(exc)
            raise
        span.finish()
        return outputs

    async def status(self) -> dict:
        return await self.runner.status()

    async def sync(self) -> dict:
        return await self.runner.sync()

    async def __del__(self):
        _log.info("model %s: worker replica stopping", self.runner.model,
                  extra={"model": self.runner.model, "event": "drain"})
        await self.runner.close()
        if self.tracing is not None:
            await asyncio.to_thread(shutdown_tracing)  # the spans still queued go out first


class LocalWorkerClient:
    """Colocated mode: the model runs inside the ingress replica (a `WorkerClient`)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    async def infer(self, version: int, inputs: dict) -> dict:
        return await self.runner.infer(version, inputs)

    async def infer_many(self, batches: list[tuple[int, dict]], done: Done) -> None:
        await self.runner.infer_many(batches, done)

    async def status(self) -> dict:
        return await self.runner.status()

    async def sync(self) -> dict:
        return await self.runner.sync()

    async def close(self) -> None:
        await self.runner.close()
