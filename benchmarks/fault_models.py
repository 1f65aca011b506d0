"""Models for fault and overload runs (the soak scenarios and the integration tests).

`slow`: about 100 ms of matrix products per call whatever the batch, so the
capacity is set by its batch size and queue, not by the HTTP layer: overload can
be offered on 2 cores without the load generator being the bottleneck.
"""

from __future__ import annotations

import io

import torch

from serving.model_config import TensorSpec, make_config
from serving.registry import ModelRepository

__all__ = ["SlowModule", "scripted_bytes", "publish_slow"]


class SlowModule(torch.nn.Module):
    """About 100 ms of matrix products per call on one core here, whatever the batch."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(384, 384) / 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.w
        for _ in range(40):
            acc = torch.tanh(acc @ self.w)
        return x * 0.0 + acc[0, 0]


def scripted_bytes(module: torch.nn.Module) -> bytes:
    """A module as the bytes of a TorchScript file."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def publish_slow(repo: ModelRepository, name: str, *, max_batch_size: int, max_queue_size: int,
                 max_inflight_batches: int = 1, **parameters: str) -> None:
    """Publish `SlowModule` (input x, output y: FP32 [1]) under `name` with this batching and queue."""
    repo.publish(
        name, {"model.pt": scripted_bytes(SlowModule())}, {},
        config=make_config(name, [TensorSpec("x", "FP32", (1,))], [TensorSpec("y", "FP32", (1,))],
                           max_batch_size=max_batch_size, max_queue_size=max_queue_size,
                           parameters={"fleet.max_inflight_batches": str(max_inflight_batches), **parameters}),
    )
