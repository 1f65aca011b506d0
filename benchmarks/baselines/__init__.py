"""Baselines (anchors) that fleet is measured against, on the same model file and request bodies.

- `PlainHttpServer` (`plain_http`): one uvicorn + Starlette process, no batching, no
  Ray: the HTTP ceiling for Python.
- `ServeDefaultServer` (`serve_default`): a default Ray Serve deployment behind the
  Python proxy, one request per forward pass.
- `measure_inprocess` (`inprocess`): the raw TorchScript model in-process (the limit
  for compute) and the per-request cost of fleet's codec.

The names load on first use, so `python -m benchmarks.baselines.<module>` runs a module
that is not imported yet, and importing the package costs nothing (Ray is imported only
by the Serve baseline's child process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["ManagedServer", "PlainHttpServer", "ServeDefaultServer", "measure_inprocess"]

_WHERE = {
    "ManagedServer": "benchmarks.baselines._process",
    "PlainHttpServer": "benchmarks.baselines.plain_http",
    "ServeDefaultServer": "benchmarks.baselines.serve_default",
    "measure_inprocess": "benchmarks.baselines.inprocess",
}

if TYPE_CHECKING:
    from benchmarks.baselines._process import ManagedServer
    from benchmarks.baselines.inprocess import measure_inprocess
    from benchmarks.baselines.plain_http import PlainHttpServer
    from benchmarks.baselines.serve_default import ServeDefaultServer


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
