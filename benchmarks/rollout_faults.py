"""Fault-injecting versions of a model, for the rollout tests and benchmarks.

Each wraps a published TorchScript module (the stable version's file) and is itself
TorchScript, so fleet serves it as any version: the faults are real (an exception raised in
the model, real compute time, real changed answers), not a mock of the serving path.

- `identical`: the same file (an A/A candidate);
- `Crash`: every batch of real inputs raises (a batch of zeros, as the warm-up at load sends,
  passes: a version that loads and then fails its traffic);
- `FailShare(share)`: a batch raises with probability `share`;
- `Slow(iterations, share)`: adds `iterations` rounds of 64x64 matrix products to a share of batches
  (1.0: everywhere; a small share: the tail only); `calibrate_iterations` picks the count for a delay;
- `ChangeOutputs(share)`: a share of rows answered with a uniform random probability;
- `FlipShare(share)`: a share of rows answered 1 - p (the accuracy drops by about share x (2 acc - 1)).
"""

from __future__ import annotations

import io
import time

import torch

__all__ = ["Crash", "FailShare", "Slow", "ChangeOutputs", "FlipShare", "wrap", "calibrate_iterations"]


class Crash(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0.0).any()):
            raise RuntimeError("injected fault: this version crashes on every batch")
        return self.inner(x)


class FailShare(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, share: float):
        super().__init__()
        self.inner = inner
        self.share = share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(1)) < self.share:
            raise RuntimeError("injected fault: this batch fails")
        return self.inner(x)


class Slow(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, iterations: int, share: float = 1.0):
        super().__init__()
        self.inner = inner
        self.iterations = iterations
        self.share = share
        self.register_buffer("w", torch.randn(64, 64) / 8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.share >= 1.0 or float(torch.rand(1)) < self.share:
            acc = self.w
            for _ in range(self.iterations):
                acc = torch.tanh(acc @ self.w)
            out = out + 0.0 * acc[0, 0]
        return out


class ChangeOutputs(torch.nn.Module):
    """A share of rows answered with a uniform random probability, or (`flip`) with 1 - p."""

    def __init__(self, inner: torch.nn.Module, share: float, flip: bool = False):
        super().__init__()
        self.inner = inner
        self.share = share
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        changed = torch.rand(out.shape[0], 1) < self.share
        return torch.where(changed, 1.0 - out if self.flip else torch.rand_like(out), out)


class FlipShare(ChangeOutputs):
    """A share of rows answered 1 - p: the accuracy drops by about share x (2 accuracy - 1)."""

    def __init__(self, inner: torch.nn.Module, share: float):
        super().__init__(inner, share, flip=True)


def wrap(model_file: bytes, fault: type[torch.nn.Module] | None, *args) -> bytes:
    """The TorchScript file of `fault(inner, *args)` around the module in `model_file` (None: the same bytes)."""
    if fault is None:
        return model_file
    inner = torch.jit.load(io.BytesIO(model_file))
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(fault(inner, *args)), buffer)
    return buffer.getvalue()


def calibrate_iterations(delay_s: float) -> int:
    """Rounds of `Slow`'s loop that take about `delay_s` on this machine (one thread, as a replica runs it)."""
    probe = torch.jit.script(Slow(torch.nn.Identity(), 2000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(1, 1)
        probe(x)
        started = time.perf_counter()
        probe(x)
        per_round = (time.perf_counter() - started) / 2000
    finally:
        torch.set_num_threads(threads)
    return max(1, round(delay_s / per_round))
