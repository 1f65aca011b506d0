"""Model execution: the versions a model serves, loaded on their backends.

`ModelRunner` loads the versions the model's version_policy selects, warms them
up and runs whole batches (NumPy arrays in, NumPy arrays out). It lives either
in a worker replica (`ModelWorker`, one Serve deployment per model, reached by
one DeploymentHandle call per batch) or, in colocated mode, in the ingress
replica itself (`LocalWorkerClient`: no Ray call at all). No HTTP here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os

from serving.backends import Backend, make_backend
from serving.errors import ModelNotFound
from serving.registry import ModelRepository

__all__ = ["ModelRunner", "ModelWorker", "LocalWorkerClient"]

_log = logging.getLogger("fleet.worker")


class ModelRunner:
    """One model's loaded versions. Build with `await ModelRunner.load(...)`."""

    def __init__(self, model: str, backends: dict[int, Backend]):
        self.model = model
        self.backends = backends

    @classmethod
    async def load(cls, repository: str, model: str, threads: int | None = None) -> "ModelRunner":
        repo = ModelRepository(repository)
        spec = repo.spec(model)
        versions = repo.served_versions(model, spec)
        if not versions:
            raise ModelNotFound(f"model {model!r} has no published version to serve in {repository}")

        async def one(version: int) -> Backend:
            model_file = None if spec.backend == "triton" else repo.model_file(model, version, spec)
            backend = make_backend(spec, version, model_file, threads=threads)
            await backend.load()
            return backend

        loaded = await asyncio.gather(*(one(v) for v in versions))
        return cls(model, dict(zip(versions, loaded)))

    async def infer(self, version: int, inputs: dict) -> dict:
        """Run one batch through `version`; arrays in, arrays out."""
        backend = self.backends.get(version)
        if backend is None:
            raise ModelNotFound(f"model {self.model!r} version {version} is not loaded on this worker")
        return await backend.infer(inputs)

    async def status(self) -> dict:
        """Loaded versions and backend details, for readiness and `fleet status`."""
        any_backend = next(iter(self.backends.values()), None)
        return {
            "model": self.model,
            "versions": sorted(self.backends),
            "backend": any_backend.describe() if any_backend else {},
            "pid": os.getpid(),
        }

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()


class ModelWorker:
    """Serve deployment class for split mode (wrapped with `serve.deployment` by `serving.app`)."""

    async def __init__(self, repository: str, model: str, threads: int | None = None):
        self.runner = await ModelRunner.load(repository, model, threads)
        gc.collect()
        gc.freeze()  # as in the ingress: what start-up made lives as long as the replica

    async def infer(self, version: int, inputs: dict) -> dict:
        return await self.runner.infer(version, inputs)

    async def status(self) -> dict:
        return await self.runner.status()

    async def __del__(self):
        await self.runner.close()


class LocalWorkerClient:
    """Colocated mode: the model runs inside the ingress replica (a `WorkerClient`)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    async def infer(self, version: int, inputs: dict) -> dict:
        return await self.runner.infer(version, inputs)

    async def status(self) -> dict:
        return await self.runner.status()

    async def close(self) -> None:
        await self.runner.close()
