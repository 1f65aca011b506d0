"""The worker: one Serve deployment per model, executing whole batches on its backend.

It loads the versions the model's version_policy selects, warms them up, and
answers one call per batch with NumPy arrays. No HTTP here.
"""

from __future__ import annotations

import asyncio
import logging
import os

from serving.backends import Backend, make_backend
from serving.errors import ModelNotFound
from serving.registry import ModelRepository

__all__ = ["ModelWorker"]

_log = logging.getLogger("fleet.worker")


class ModelWorker:
    """Serve deployment class (wrapped with `serve.deployment` by `serving.app`)."""

    async def __init__(self, repository: str, model: str, threads: int | None = None):
        self.model = model
        self.repository = ModelRepository(repository)
        self.spec = self.repository.spec(model)
        self._threads = threads
        self.backends: dict[int, Backend] = {}
        versions = self.repository.served_versions(model, self.spec)
        if not versions:
            raise ModelNotFound(f"model {model!r} has no published version to serve in {repository}")
        loaded = await asyncio.gather(*(self._load(v) for v in versions))
        self.backends = dict(zip(versions, loaded))

    async def _load(self, version: int) -> Backend:
        model_file = None if self.spec.backend == "triton" else self.repository.model_file(self.model, version, self.spec)
        backend = make_backend(self.spec, version, model_file, threads=self._threads)
        await backend.load()
        return backend

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

    async def __del__(self):
        for backend in self.backends.values():
            await backend.close()
