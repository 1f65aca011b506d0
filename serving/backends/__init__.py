"""Model backends: take a batch of NumPy arrays, return the output arrays.

Workers never see HTTP; backends never see Ray. `make_backend` picks one from
the model's config.
"""

from __future__ import annotations

from serving.backends.base import Backend
from serving.model_config import ModelSpec

__all__ = ["Backend", "make_backend"]


def make_backend(spec: ModelSpec, version: int, model_file=None, *, device: str | None = None,
                 threads: int | None = None) -> Backend:
    """The backend the model's config names, not yet loaded (call `await backend.load()`)."""
    if spec.backend == "triton":
        from serving.backends.triton import TritonBackend

        return TritonBackend(spec, version)
    from serving.backends.torchscript import TorchScriptBackend

    return TorchScriptBackend(spec, version, model_file, device=device, threads=threads)
