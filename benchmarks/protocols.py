"""`python -m benchmarks.protocols`: gRPC against HTTP on the same cluster, in the same run.

    python -m benchmarks.protocols             # 4 rounds of 8 s per point, 2 alternating runs of 120 s (about 8 minutes)
    python -m benchmarks.protocols --quick     # 2 rounds of 4 s, alternating runs of 30 s

One fleet cluster (the defaults: fleet's HTTP listener and the gRPC listener in each ingress
replica, fraud colocated) serves the `fraud` model trained into a fresh repository. Each round
measures, in alternating order (ABBA), one-row requests of the same random features:
- HTTP with the binary tensor extension: Debian's wrk (`benchmarks.wrk`), closed loop;
- gRPC `ModelInfer` with the tensor in `raw_input_contents`: nghttp2's h2load
  (`benchmarks.h2load`), closed loop, one call in flight per connection (64 connections =
  64 channels; a channel is one connection);
at 64 connections (throughput) and at 1 (latency). h2load sees HTTP/2, not gRPC statuses, so
the gRPC message is first checked with a real gRPC client and each run's calls are compared
with the success count fleet's statistics gained over it.

Goals (issue 17): gRPC throughput at 64 >= 1.0 x HTTP binary; gRPC p50 at 1 connection <= HTTP's.
Then the response cache's and tracing's rows (`benchmarks.protocols_extra`: a cache hit's server-side
time; hits against computed requests, and traced against untraced requests, each alternating by
phases on the same 64 connections). Writes report.json and summary.md into --out (default
benchmarks/results/protocols/<timestamp>/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.h2load import run_h2load
from benchmarks.live_cluster import start_cluster
from benchmarks.protocols_extra import CACHED, cache_alternating, cache_hit_latency, publish_cached, \
    tracing_alternating
from benchmarks.report import git_sha, machine
from benchmarks.wrk import run_wrk

__all__ = ["main", "grpc_message"]

MODEL = "fraud"
RESULTS = Path("benchmarks/results/protocols")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_message(repository: str, model: str, rows: int = 1, seed: int = 0) -> bytes:
    """A ModelInferRequest with the same random inputs as `benchmarks.bodies.request_bodies`, raw contents."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    from serving.datatypes import numpy_dtype
    from serving.registry import ModelRepository

    spec = ModelRepository(repository).spec(model)
    rng = np.random.default_rng(seed)
    msg = pb.ModelInferRequest(model_name=model)
    for t in spec.inputs:
        shape = ([rows] if spec.max_batch_size else []) + [1 if d == -1 else d for d in t.dims]
        data = rng.standard_normal(shape).astype(numpy_dtype(t.datatype))
        msg.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
        msg.raw_input_contents.append(data.astype(data.dtype.newbyteorder("<")).tobytes())
    return msg.SerializeToString()


def _check_grpc(address: str, message: bytes) -> None:
    import grpc

    with grpc.insecure_channel(address) as channel:
        channel.unary_unary(METHOD)(message, timeout=30)  # raises on any status but OK


def _successes(url: str) -> int:
    stats = httpx.get(f"{url}/v2/models/{MODEL}/stats", timeout=30).json()["model_stats"]
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def _point(kind: str, settings, body: Path, header_length: int, message: bytes, connections: int,
           duration_s: float) -> dict:
    before = _successes(settings.url)
    if kind == "http":
        result = run_wrk(f"{settings.url}/v2/models/{MODEL}/infer", body, header_length, connections=connections,
                         threads=min(2, connections), duration_s=duration_s)
    else:
        result = run_h2load(settings.host, settings.grpc_port, METHOD, message, clients=connections,
                            threads=min(2, connections), duration_s=duration_s)
    counted = _successes(settings.url) - before
    doc = result.to_dict()
    return {"kind": kind, "connections": connections, "throughput_rps": round(doc["throughput_rps"], 1),
            "requests": doc["requests"], "statuses": doc["statuses"], "errors": doc["errors"],
            "latency_ms": {k: doc["latency_ms"][k] for k in ("p50", "p90", "p99")}, "fleet_successes": counted}


def run_protocols(work: Path, rounds: int, duration_s: float, alt_seconds: float = 60.0, phase_s: float = 2.0,
                  log=print) -> dict:
    from benchmarks.bodies import request_bodies
    from cluster.config import FleetSettings
    from training.bootstrap import bootstrap

    log(f"protocols: training {MODEL} into {work / 'repository'} ...")
    bootstrap(str(work / "repository"), rows=8000, epochs=2, log=lambda line: None)
    publish_cached(str(work / "repository"))
    binary, header_length = request_bodies(str(work / "repository"), MODEL, rows=1)["binary"]
    body = work / "binary.body"
    body.write_bytes(binary)
    message = grpc_message(str(work / "repository"), MODEL, rows=1)
    log("cache: a hit's and a computed request's server-side time, in this process ...")
    hit_latency = cache_hit_latency(str(work / "repository"), binary, header_length)
    log(f"  {hit_latency}")
    base = FleetSettings(repository=str(work / "repository"), state_dir=str(work / "state"),
                         log_predictions=False, retrain_after_s=None, response_cache_bytes=64 << 20)
    cluster, settings = start_cluster(base, log=log)
    runs = []
    try:
        _check_grpc(f"{settings.host}:{settings.grpc_port}", message)
        run_wrk(f"{settings.url}/v2/models/{MODEL}/infer", body, header_length, connections=16, duration_s=3)
        run_h2load(settings.host, settings.grpc_port, METHOD, message, clients=16, duration_s=3)
        for r in range(rounds):
            order = ("http", "grpc") if r % 2 == 0 else ("grpc", "http")
            for connections in (64, 1):
                for kind in order:
                    point = _point(kind, settings, body, header_length, message, connections, duration_s)
                    point["round"] = r
                    runs.append(point)
                    log(f"  round {r} {kind:4s} c={connections:2d}: {point['throughput_rps']:8.0f} req/s  "
                        f"p50 {point['latency_ms']['p50']:.3f} ms  p99 {point['latency_ms']['p99']:.2f} ms  "
                        f"(fleet counted {point['fleet_successes']} of {point['requests']})")
                    time.sleep(0.5)
        log(f"cache: {CACHED} against {MODEL}, alternating by {phase_s:g} s phases for {alt_seconds:g} s ...")
        cache = cache_alternating(settings, body, header_length, alt_seconds, phase_s)
        log(f"  hits / computed: mean {cache['mean']} (95 % interval {cache['ci95']}) over {cache['n']} pairs")
    finally:
        cluster.stop()
    log(f"tracing: traced against untraced requests, alternating for {alt_seconds:g} s ...")
    tracing = tracing_alternating(base, body, header_length, alt_seconds, phase_s, log)
    log(f"  traced / untraced: mean {tracing['mean']} (95 % interval {tracing['ci95']}) over {tracing['n']} pairs, "
        f"{tracing['otlp_requests']} OTLP exports")
    return {"runs": runs, "cache_server_side": hit_latency, "cache": cache, "tracing": tracing,
            "goals": goals(runs) + extra_goals(hit_latency, cache, tracing)}


def extra_goals(hit: dict, cache: dict, tracing: dict) -> list[dict]:
    """The cache's and tracing's goals; a ratio's goal is met when its whole 95 % interval meets it."""
    def low(doc):
        return (doc.get("ci95") or [None])[0]

    return [
        {"goal": "cache hit, server side: p50 <= 0.1 ms", "hit_p50_us": hit["hit"]["p50_us"],
         "computed_p50_us": hit["computed"]["p50_us"], "met": hit["hit"]["p50_us"] <= 100},
        {"goal": "cache hits at 64 connections >= 2 x misses (fraud computed; alternating phases)",
         "hits_rps": cache["a_rps"], "computed_rps": cache["b_rps"], "ratio": cache["mean"], "ci95": cache["ci95"],
         "pairs": cache["n"], "met": low(cache) is not None and low(cache) >= 2.0},
        {"goal": "tracing every request costs <= 10 % of throughput (traced / untraced, alternating phases)",
         "traced_rps": tracing["a_rps"], "untraced_rps": tracing["b_rps"], "ratio": tracing["mean"],
         "ci95": tracing["ci95"], "pairs": tracing["n"], "met": low(tracing) is not None and low(tracing) >= 0.9},
    ]


def _median(runs: list[dict], kind: str, connections: int, key) -> float:
    return statistics.median(key(r) for r in runs if r["kind"] == kind and r["connections"] == connections)


def goals(runs: list[dict]) -> list[dict]:
    """The issue's goals over the runs: medians of the rounds, and each round's own ratio's range."""
    thr = {k: _median(runs, k, 64, lambda r: r["throughput_rps"]) for k in ("http", "grpc")}
    p50 = {k: _median(runs, k, 1, lambda r: r["latency_ms"]["p50"]) for k in ("http", "grpc")}
    per_round = {}
    for r in runs:
        per_round.setdefault((r["round"], r["connections"]), {})[r["kind"]] = r
    ratios = [pair["grpc"]["throughput_rps"] / pair["http"]["throughput_rps"]
              for (_, c), pair in per_round.items() if c == 64 and pair["http"]["throughput_rps"]]
    lost = [r for r in runs if r["kind"] == "grpc" and r["fleet_successes"] < 0.99 * r["requests"]]
    return [
        {"goal": "gRPC throughput at 64 connections >= 1.0 x HTTP binary", "grpc_rps": thr["grpc"],
         "http_rps": thr["http"], "ratio": round(thr["grpc"] / thr["http"], 3),
         "round_ratios": [round(x, 3) for x in ratios], "met": thr["grpc"] >= thr["http"]},
        {"goal": "gRPC p50 at 1 connection <= HTTP's", "grpc_p50_ms": p50["grpc"], "http_p50_ms": p50["http"],
         "met": p50["grpc"] <= p50["http"]},
        {"goal": "every gRPC call h2load completed was a success fleet counted", "runs_short": len(lost),
         "met": not lost},
    ]


def summary_markdown(report: dict) -> str:
    lines = ["| protocol | connections | median req/s | median p50 ms | median p99 ms |", "|---|---|---|---|---|"]
    runs = report["runs"]
    for connections in (64, 1):
        for kind, name in (("http", "HTTP binary (wrk)"), ("grpc", "gRPC raw contents (h2load)")):
            lines.append(f"| {name} | {connections} | {_median(runs, kind, connections, lambda r: r['throughput_rps']):,.0f} "
                         f"| {_median(runs, kind, connections, lambda r: r['latency_ms']['p50']):.3f} "
                         f"| {_median(runs, kind, connections, lambda r: r['latency_ms']['p99']):.2f} |")
    if report.get("cache"):
        lines += ["", "| HTTP binary, wrk, 64 connections, alternating phases | A req/s | B req/s | A / B: mean (95 % "
                  "interval), pairs |", "|---|---:|---:|---|"]
        for doc, name in ((report["cache"], "A `fraud_cached`, every request a hit; B `fraud` computed"),
                          (report["tracing"], "A every request traced (OTLP/HTTP); B none")):
            ci = doc.get("ci95") or [None, None]
            lines.append(f"| {name} | {doc['a_rps']:,.0f} | {doc['b_rps']:,.0f} | {doc['mean']} ({ci[0]} to {ci[1]}), "
                         f"{doc['n']} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in report["goals"]:
        facts = ", ".join(f"{k} {v}" for k, v in g.items() if k not in ("goal", "met"))
        lines.append(f"| {g['goal']} | {facts} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocols", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per point")
    parser.add_argument("--alternate", type=float, default=120.0, help="seconds of each alternating run (cache, "
                        "tracing)")
    parser.add_argument("--phase", type=float, default=2.0, help="seconds per phase of the alternating runs")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s, alternating runs of 30 s")
    parser.add_argument("--out", type=Path, help=f"default {RESULTS}/<timestamp>/")
    args = parser.parse_args(argv)
    rounds, duration = (2, 4.0) if args.quick else (args.rounds, args.duration)
    alt_seconds = 30.0 if args.quick else args.alternate
    out = args.out or RESULTS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="fleet-protocols-") as tmp:
        report = run_protocols(Path(tmp), rounds, duration, alt_seconds, args.phase)
    report.update(git_sha=git_sha(), machine=machine(), rounds=rounds, duration_s=duration, alternate_s=alt_seconds,
                  phase_s=args.phase)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
