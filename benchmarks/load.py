"""The result every load generator returns (`LoadResult`) and the latency summary behind it.

Both `benchmarks.wrk` (closed loop, Debian wrk) and `benchmarks.loadgen` (asyncio,
open or closed loop) fill the same record, so a report can put them side by side:

- `requests` counts completed responses of any status; transport failures
  (connect/read/write/timeout) are not responses and are counted in `errors`.
- `throughput_rps` counts only 2xx responses: a server that answers 503 fast
  is not serving.
- `latency_ms` summarizes every completed response, whatever its status, so
  an overloaded server's fast 503s show up as what clients saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["LATENCY_KEYS", "LoadResult", "count_2xx", "summarize"]

LATENCY_KEYS = ("mean", "p50", "p90", "p95", "p99", "max")
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}


def summarize(latencies_ns: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """{"mean","p50","p90","p95","p99","max"} in milliseconds from latencies in nanoseconds.

    Percentiles use numpy's default (linear interpolation between closest ranks).
    No latencies gives None for every key: JSON has no NaN, and a plot or a
    table should show "no data" rather than a made-up zero.
    """
    values = np.asarray(latencies_ns, dtype=np.float64).ravel()
    if values.size == 0:
        return {key: None for key in LATENCY_KEYS}
    ms = values / 1e6
    out: dict[str, float | None] = {"mean": float(ms.mean())}
    points = np.percentile(ms, list(_PERCENTILES.values()))
    out.update({key: float(v) for key, v in zip(_PERCENTILES, points)})
    out["max"] = float(ms.max())
    return {key: out[key] for key in LATENCY_KEYS}


def count_2xx(statuses: dict[str, int]) -> int:
    """Responses whose status is 200-299, from {"200": n, ...}."""
    return sum(n for code, n in statuses.items() if 200 <= int(code) < 300)


@dataclass
class LoadResult:
    """One load run against one URL (or one mix of targets).

    tool:           "wrk" or "asyncio".
    mode:           "closed" (N connections sending back to back) or "open" (requests at a scheduled rate).
    connections:    closed-loop connection count (wrk and `closed_loop`); None for open loop.
    rate_rps:       open-loop target rate; None for closed loop.
    duration_s:     measured wall time of the run, seconds.
    requests:       completed responses, any status.
    throughput_rps: completed 2xx responses / duration_s.
    latency_ms:     `summarize` over all completed responses (None values when there were none).
    statuses:       {"200": n, "503": m, ...}.
    errors:         transport errors by kind ("connect", "read", "write", "timeout"); zero kinds omitted.
    by_target:      open/closed asyncio runs with several targets: {target name: LoadResult.to_dict()}.
    latency_2xx_ms: asyncio runs: `summarize` over the 2xx responses only (what the accepted requests
                    saw under overload, where fast refusals pull `latency_ms` down); {} for wrk.
    versions:       wrk runs with `count_versions`: the 200 answers by their "model_version" ("none": without one).
    """

    tool: str
    mode: str
    connections: int | None
    rate_rps: float | None
    duration_s: float
    requests: int
    throughput_rps: float
    latency_ms: dict[str, float | None]
    statuses: dict[str, int]
    errors: dict[str, int]
    by_target: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_2xx_ms: dict[str, float | None] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (no NaN: missing latencies are None)."""
        d = asdict(self)
        d["latency_ms"] = {k: _finite_or_none(v) for k, v in self.latency_ms.items()}
        d["latency_2xx_ms"] = {k: _finite_or_none(v) for k, v in self.latency_2xx_ms.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadResult:
        """The inverse of `to_dict`; `by_target` may be absent (older results)."""
        return cls(
            tool=str(d["tool"]),
            mode=str(d["mode"]),
            connections=None if d.get("connections") is None else int(d["connections"]),
            rate_rps=None if d.get("rate_rps") is None else float(d["rate_rps"]),
            duration_s=float(d["duration_s"]),
            requests=int(d["requests"]),
            throughput_rps=float(d["throughput_rps"]),
            latency_ms={k: _finite_or_none(d["latency_ms"].get(k)) for k in LATENCY_KEYS},
            statuses={str(k): int(v) for k, v in d.get("statuses", {}).items()},
            errors={str(k): int(v) for k, v in d.get("errors", {}).items()},
            by_target={str(k): dict(v) for k, v in d.get("by_target", {}).items()},
            latency_2xx_ms={k: _finite_or_none(v) for k, v in d.get("latency_2xx_ms", {}).items()},
            versions={str(k): int(v) for k, v in d.get("versions", {}).items()},
        )


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
