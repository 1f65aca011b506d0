"""`python -m benchmarks.protocols`: gRPC against HTTP on the same cluster, in the same run.

    python -m benchmarks.protocols             # 4 rounds of 8 s per point (about 4 minutes)
    python -m benchmarks.protocols --quick     # 2 rounds of 4 s

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
time, hits against computed requests at 64 connections, a cluster tracing every request against one
tracing none). Writes report.json and summary.md into --out (default
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
from benchmarks.protocols_extra import CACHED, OtlpSink, cache_hit_latency, publish_cached
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


def run_protocols(work: Path, rounds: int, duration_s: float, log=print) -> dict:
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
    runs, cache_runs = [], []
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
        for r in range(rounds):
            for model in ((CACHED, MODEL) if r % 2 == 0 else (MODEL, CACHED)):
                result = run_wrk(f"{settings.url}/v2/models/{model}/infer", body, header_length, connections=64,
                                 threads=2, duration_s=duration_s).to_dict()
                cache_runs.append({"round": r, "model": model, "throughput_rps": round(result["throughput_rps"], 1),
                                   "statuses": result["statuses"], "p50_ms": result["latency_ms"]["p50"]})
                log(f"  round {r} {model:12s} c=64: {result['throughput_rps']:8.0f} req/s")
                time.sleep(0.5)
    finally:
        cluster.stop()
    tracing_runs = _tracing_rounds(base, body, header_length, rounds, duration_s, log)
    return {"runs": runs, "cache_server_side": hit_latency, "cache_runs": cache_runs, "tracing_runs": tracing_runs,
            "goals": goals(runs) + extra_goals(hit_latency, cache_runs, tracing_runs)}


def _tracing_rounds(base, body: Path, header_length: int, rounds: int, duration_s: float, log) -> list[dict]:
    """Clusters tracing no request and every request (OTLP to a sink here), off/on/on/off ...; wrk at 64."""
    sink = OtlpSink()
    out = []
    try:
        for r in range(rounds):
            for ratio in ((0.0, 1.0) if r % 2 == 0 else (1.0, 0.0)):
                settings = base.model_copy(update={"tracing_sample_ratio": ratio,
                                                   "otlp_endpoint": sink.endpoint if ratio else None})
                cluster, settings = start_cluster(settings, log=log)
                try:
                    url = f"{settings.url}/v2/models/{MODEL}/infer"
                    run_wrk(url, body, header_length, connections=16, duration_s=3)  # warm-up
                    before = sink.requests
                    result = run_wrk(url, body, header_length, connections=64, threads=2,
                                     duration_s=duration_s).to_dict()
                finally:
                    cluster.stop()
                out.append({"round": r, "tracing_sample_ratio": ratio,
                            "throughput_rps": round(result["throughput_rps"], 1), "statuses": result["statuses"],
                            "p50_ms": result["latency_ms"]["p50"], "p99_ms": result["latency_ms"]["p99"],
                            "otlp_requests": sink.requests - before})
                log(f"  round {r} tracing {ratio:.0%}: {result['throughput_rps']:8.0f} req/s "
                    f"({out[-1]['otlp_requests']} OTLP exports)")
    finally:
        sink.stop()
    return out


def extra_goals(hit: dict, cache_runs: list[dict], tracing_runs: list[dict]) -> list[dict]:
    cached = statistics.median(r["throughput_rps"] for r in cache_runs if r["model"] == CACHED)
    computed = statistics.median(r["throughput_rps"] for r in cache_runs if r["model"] == MODEL)
    off = statistics.median(r["throughput_rps"] for r in tracing_runs if r["tracing_sample_ratio"] == 0)
    on = statistics.median(r["throughput_rps"] for r in tracing_runs if r["tracing_sample_ratio"] == 1)
    return [
        {"goal": "cache hit, server side: p50 <= 0.1 ms", "hit_p50_us": hit["hit"]["p50_us"],
         "computed_p50_us": hit["computed"]["p50_us"], "met": hit["hit"]["p50_us"] <= 100},
        {"goal": "cache hits at 64 connections >= 2 x misses (fraud computed)", "hits_rps": cached,
         "computed_rps": computed, "ratio": round(cached / computed, 3), "met": cached >= 2 * computed},
        {"goal": "tracing every request costs <= 10 % of throughput", "off_rps": off, "on_rps": on,
         "ratio": round(on / off, 3), "met": on >= 0.9 * off},
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
    if report.get("cache_runs"):
        lines += ["", "| response cache and tracing (HTTP binary, wrk, 64 connections) | median req/s |", "|---|---|"]
        for model, name in ((MODEL, "fraud, computed (no cache)"), (CACHED, "fraud_cached, every request a hit")):
            lines.append(f"| {name} | {statistics.median(r['throughput_rps'] for r in report['cache_runs'] if r['model'] == model):,.0f} |")
        for ratio, name in ((0.0, "tracing off"), (1.0, "tracing every request (OTLP/HTTP)")):
            lines.append(f"| fraud, {name} | {statistics.median(r['throughput_rps'] for r in report['tracing_runs'] if r['tracing_sample_ratio'] == ratio):,.0f} |")
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
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s")
    parser.add_argument("--out", type=Path, help=f"default {RESULTS}/<timestamp>/")
    args = parser.parse_args(argv)
    rounds, duration = (2, 4.0) if args.quick else (args.rounds, args.duration)
    out = args.out or RESULTS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="fleet-protocols-") as tmp:
        report = run_protocols(Path(tmp), rounds, duration)
    report.update(git_sha=git_sha(), machine=machine(), rounds=rounds, duration_s=duration)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
