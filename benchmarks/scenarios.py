"""Benchmark scenarios: what load is sent to a system and what is recorded.

- `closed_sweep`: wrk, closed loop, over a list of connection counts, for JSON
  and/or binary bodies; with the server's own view (batch sizes, queue/compute)
  from its statistics endpoint before and after each run.
- `binary_vs_json`: binary-tensor against JSON bodies of the same request, taking
  turns by phases on the same connections of one wrk run.
- `open_rate`: the asyncio generator at a fixed rate (Poisson arrivals), latency
  measured from each request's intended send time.
- `step_rates`: an open-loop load rising in steps (the adaptive batching scenario).
- `mixed_models`: one open-loop load spread over several models and body kinds
  by weight, with per-target latencies (what wrk cannot do).
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks.loadgen import Target, open_loop, run
from benchmarks.systems import System, fetch_stats, stats_delta
from benchmarks.logging_report import paired_ratios
from benchmarks.wrk import phase_pairs, run_alternating_bodies, run_wrk

__all__ = ["Bodies", "closed_sweep", "binary_vs_json", "open_rate", "step_rates", "mixed_models", "infer_path"]


@dataclass(frozen=True)
class Bodies:
    """The request bodies every system gets: one KServe v2 JSON and one binary-tensor body."""

    folder: Path
    model: str
    json_body: bytes
    binary_body: bytes
    binary_header_length: int

    def file(self, kind: str) -> Path:
        return self.folder / f"{self.model}-{kind}.body"

    def header_length(self, kind: str) -> int | None:
        return self.binary_header_length if kind == "binary" else None

    def target(self, kind: str, model: str | None = None) -> Target:
        name = model or self.model
        if kind == "binary":
            headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(self.binary_header_length)}
            return Target(infer_path(name), self.binary_body, headers, name=f"{name}-binary")
        return Target(infer_path(name), self.json_body, {"Content-Type": "application/json"}, name=f"{name}-json")


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def _record(system: System, kind: str, result, server: dict, **extra) -> dict:
    return {"system": system.name, "label": system.label, "body": kind, **result.to_dict(), "server": server, **extra}


def closed_sweep(system: System, bodies: Bodies, connections: list[int], duration_s: float,
                 kinds: tuple[str, ...] = ("json",), log=print) -> list[dict]:
    """One wrk run per (body kind, connection count)."""
    runs = []
    url = system.url + infer_path(bodies.model)
    for kind in kinds:
        # warm-up: connections, caches, the batcher's and the JIT's first batches
        run_wrk(url, bodies.file(kind), bodies.header_length(kind), connections=16, duration_s=2)
        for c in connections:
            before = fetch_stats(system.url, bodies.model)
            result = run_wrk(url, bodies.file(kind), bodies.header_length(kind), connections=c,
                             threads=min(2, c), duration_s=duration_s)
            server = stats_delta(before, fetch_stats(system.url, bodies.model))
            runs.append(_record(system, kind, result, server))
            p = result.latency_ms
            log(f"  {system.name:14s} {kind:6s} c={c:<4d} {result.throughput_rps:9.0f} req/s  "
                f"p50 {_ms(p['p50'])}  p99 {_ms(p['p99'])}  statuses {result.statuses}  "
                f"avg batch {server.get('avg_batch_rows')}")
            time.sleep(0.5)
    return runs


def binary_vs_json(system: System, bodies: Bodies, duration_s: float, phase_s: float = 2.0, connections: int = 64,
                   log=print) -> dict:
    """Binary-tensor bodies (A) against JSON bodies (B) of the same request over the same `connections`, by
    phases of `phase_s` (A B B A ...) for `duration_s`: each pair of phases gives a ratio of answers, binary over
    JSON; their mean with a 95 % bootstrap interval (`paired_ratios`). Sequential runs of each body (closed_sweep)
    differ by 10-20 % from one to the next on this machine whatever the bodies: a difference of a few percent
    shows only this way."""
    run = run_alternating_bodies(system.url + infer_path(bodies.model), bodies.file("json"), bodies.file("binary"),
                                 bodies.binary_header_length, duration_s, phase_s, connections)
    pairs = phase_pairs(run["phases"])
    ratios = paired_ratios(pairs)
    doc = {k: ratios[k] for k in ("per_pair", "n", "mean", "median", "sd", "ci95")}
    doc.update(connections=connections, seconds=duration_s, phase_s=phase_s, errors=run["errors"],
               other=sum(p["other"] for p in run["phases"].values()),
               binary_answers=sum(a for a, _ in pairs), json_answers=sum(b for _, b in pairs))
    log(f"  {system.name:14s} binary / JSON, alternating: mean {doc['mean']} (95 % interval {doc['ci95']}) "
        f"over {doc['n']} pairs of phases")
    return doc


def open_rate(system: System, bodies: Bodies, rate_rps: float, duration_s: float, kind: str = "json",
              arrivals: str = "poisson", log=print) -> dict:
    """Arrivals at `rate_rps` from the asyncio generator (coordinated-omission free)."""
    host, port = _host_port(system.url)
    before = fetch_stats(system.url, bodies.model)
    result = run(open_loop(host, port, [bodies.target(kind)], rate_rps, duration_s, arrivals=arrivals,
                                   max_connections=256))
    server = stats_delta(before, fetch_stats(system.url, bodies.model))
    p = result.latency_ms
    log(f"  {system.name:14s} open {rate_rps:7.0f}/s: {result.throughput_rps:9.0f} req/s  p50 {_ms(p['p50'])}  "
        f"p99 {_ms(p['p99'])}  statuses {result.statuses}  errors {result.errors}")
    return _record(system, kind, result, server)


def step_rates(system: System, bodies: Bodies, model: str, rates: list[float], step_s: float,
               arrivals: str = "poisson", log=print) -> list[dict]:
    """An open-loop load rising through `rates` against `model`, one record per step.

    It stops at the first step the server could not keep up with (under 80 % of the
    offered rate delivered, or a p99 over 2 s): further steps would only measure the
    backlog. Then it waits for the server to drain, so the next scenario starts clean.
    """
    host, port = _host_port(system.url)
    before = fetch_stats(system.url, model)
    out = []
    for rate in rates:
        result = run(open_loop(host, port, [bodies.target("json", model)], rate, step_s, arrivals=arrivals,
                               max_connections=256))
        p = result.latency_ms
        log(f"  {model:22s} {rate:7.0f}/s: {result.throughput_rps:8.0f} req/s  p50 {_ms(p['p50'])}  "
            f"p99 {_ms(p['p99'])}  statuses {result.statuses}")
        out.append(_record(system, "json", result, {}, model=model, offered_rps=rate))
        if result.throughput_rps < 0.8 * rate or (p["p99"] or 0) > 2000:
            log(f"  {model}: overloaded at {rate:.0f}/s, stopping the ramp")
            break
    if out:
        out[-1]["server"] = stats_delta(before, fetch_stats(system.url, model))
    cool_down(system, bodies, model)
    return out


def cool_down(system: System, bodies: Bodies, model: str, timeout_s: float = 60.0) -> None:
    """Wait until a lone request to `model` is answered quickly again (the queue has drained)."""
    body = bodies.json_body
    request = urllib.request.Request(system.url + infer_path(model), data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
        except OSError:
            pass
        if time.perf_counter() - started < 0.02:
            return
        time.sleep(0.5)


def mixed_models(system: System, bodies: Bodies, mix: dict[tuple[str, str], float], rate_rps: float,
                 duration_s: float, arrivals: str = "poisson", log=print) -> dict:
    """One open-loop load over several (model, body kind) targets, weighted; per-target results."""
    host, port = _host_port(system.url)
    targets = [replace(bodies.target(kind, model), weight=weight) for (model, kind), weight in mix.items()]
    result = run(open_loop(host, port, targets, rate_rps, duration_s, arrivals=arrivals, max_connections=256))
    for name, part in sorted(result.by_target.items()):
        p = part["latency_ms"]
        log(f"  mixed {name:26s} {part['throughput_rps']:8.0f} req/s  p50 {_ms(p['p50'])}  p99 {_ms(p['p99'])}  "
            f"statuses {part['statuses']}")
    return _record(system, "mixed", result, {}, mix={f"{m}:{k}": w for (m, k), w in mix.items()})


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def _ms(value) -> str:
    return "   n/a" if value is None else f"{value:6.2f} ms"
