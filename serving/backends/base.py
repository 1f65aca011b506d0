"""The interface every backend implements."""

from __future__ import annotations

import contextvars
import re
from typing import Mapping, Protocol

import numpy as np

from serving.model_config import TensorSpec

__all__ = ["Backend", "positional_order", "lone_request"]

_INDEXED = re.compile(r"^(?P<base>.+)__(?P<index>\d+)$")

# True while the batch being run carries one request (the batcher sets it in that batch's task): at most one
# request came while the model's previous batch ran, so the replica is lightly loaded and its event loop has
# little else to do. A cheap CPU model then runs the batch on the loop (serving/backends/torchscript.py).
lone_request: contextvars.ContextVar[bool] = contextvars.ContextVar("fleet_lone_request", default=False)


class Backend(Protocol):
    """A loaded model version that executes whole batches."""

    device: str

    async def load(self) -> None:
        """Load and warm up; raise RepositoryError/ModelUnavailable if it cannot."""

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: arrays keyed by input name in, arrays keyed by output name out."""

    async def close(self) -> None:
        """Release what the backend holds (threads, connections)."""

    async def health(self) -> str | None:
        """None when it can answer now, else why not (a remote server down)."""

    def describe(self) -> dict:
        """What /v2/models/{m} and `fleet status` show about this backend."""


def positional_order(tensors: tuple[TensorSpec, ...]) -> list[TensorSpec]:
    """Triton's libtorch convention: `input__0, input__1, ...` map to forward() by index.

    When every name carries a `__<n>` suffix, order by n; otherwise keep the
    config's order.
    """
    matches = [_INDEXED.match(t.name) for t in tensors]
    if all(matches):
        return [t for _, t in sorted(zip((int(m["index"]) for m in matches), tensors), key=lambda p: p[0])]
    return list(tensors)
