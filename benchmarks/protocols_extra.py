"""The response-cache and tracing rows of `python -m benchmarks.protocols`.

- Cache, server side: one process's `InferenceService` over the real `fraud` TorchScript file (a
  `ModelRunner`, the colocated path), the binary request of the throughput runs, timed per call
  (decode, validate, key, lookup, encode: everything but the socket) over `calls` calls of a hit and
  of a computed request. Goal: p50 of a hit <= 0.1 ms.
- Cache, cluster: one wrk run at 64 connections alternating by phases of a few seconds (A B B A ...,
  `benchmarks.wrk.run_alternating`) between `fraud_cached` (the same file, `response_cache { enable:
  true }`; one body, so every request after each replica's first is a hit) and `fraud` (every
  request computed: what a miss costs, less the key and store, about 10 µs). Each pair of phases
  gives a ratio; their mean with a 95 % bootstrap interval. Goal: hits >= 2 x misses.
- Tracing: a cluster tracing every request that carries a sampled W3C `traceparent` (and, at
  `tracing_sample_ratio` 1e-6, practically no other), spans sent as OTLP/HTTP to a sink in this
  process that reads and discards them; one wrk run alternating between requests with that header
  (traced) and without (not traced) on the same connections, as above. Goal: the traced phases
  answer >= 0.9 x the untraced ones, met when the interval's lower end is. A client's traceparent
  is parsed on top of what a new trace costs, so this errs toward a higher cost. (The clusters
  started with tracing off and on that this replaced differed by 10-20 % from one start to the next.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np

__all__ = ["publish_cached", "cache_hit_latency", "OtlpSink", "cache_alternating", "tracing_alternating",
           "TRACEPARENT"]

CACHED = "fraud_cached"
# A sampled W3C traceparent (the spec's example): every request carrying it is traced.
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
_BINARY = "application/octet-stream"


def _alternating(settings, path_a: str, path_b: str, body, header_length: int, seconds: float, phase_s: float,
                 header_a=None) -> dict:
    """One alternating wrk run of binary-tensor bodies; its pairs (A, B) and their ratios' statistics."""
    from benchmarks.logging_report import paired_ratios
    from benchmarks.wrk import phase_pairs, run_alternating

    result = run_alternating(settings.url, body, path_a, path_b, seconds, phase_s, header_a=header_a,
                             headers={"Content-Type": _BINARY, "Inference-Header-Content-Length": str(header_length)})
    pairs = phase_pairs(result["phases"])
    stats = paired_ratios(pairs)
    return {"seconds": seconds, "phase_s": phase_s, "pairs": pairs, "errors": result["errors"],
            "non_2xx": sum(p["other"] for p in result["phases"].values()),
            "a_rps": round(sum(a for a, _ in pairs) / (phase_s * len(pairs)), 1) if pairs else None,
            "b_rps": round(sum(b for _, b in pairs) / (phase_s * len(pairs)), 1) if pairs else None,
            **{k: stats[k] for k in ("n", "mean", "median", "sd", "ci95")}}


def cache_alternating(settings, body, header_length: int, seconds: float, phase_s: float, model: str = "fraud") -> dict:
    """Hits (`CACHED`) against computed requests (`model`) alternating on the same connections of a running
    cluster: `mean` is hits / computed."""
    return _alternating(settings, f"/v2/models/{CACHED}/infer", f"/v2/models/{model}/infer", body, header_length,
                        seconds, phase_s)


def tracing_alternating(base, body, header_length: int, seconds: float, phase_s: float, log=print,
                        model: str = "fraud") -> dict:
    """A cluster of `base` settings tracing the requests that carry TRACEPARENT (to an OtlpSink), alternating
    traced and untraced requests on the same connections: `mean` is traced / untraced."""
    from benchmarks.live_cluster import start_cluster
    from benchmarks.wrk import run_wrk

    sink = OtlpSink()
    try:
        settings = base.model_copy(update={"tracing_sample_ratio": 1e-6, "otlp_endpoint": sink.endpoint})
        cluster, settings = start_cluster(settings, log=log)
        try:
            path = f"/v2/models/{model}/infer"
            run_wrk(settings.url + path, body, header_length, connections=16, duration_s=3,
                    headers={"traceparent": TRACEPARENT})  # warm-up, the export path too
            before = (sink.requests, sink.bytes)
            out = _alternating(settings, path, path, body, header_length, seconds, phase_s,
                               header_a=("traceparent", TRACEPARENT))
            time.sleep(1.5)  # the replicas' last exports (every 0.5 s)
        finally:
            cluster.stop()
        out.update(otlp_requests=sink.requests - before[0], otlp_bytes=sink.bytes - before[1])
    finally:
        sink.stop()
    return out


def publish_cached(repository: str, model: str = "fraud") -> None:
    """A copy of `model`'s newest version (file, metadata) with the response cache enabled, as `CACHED`
    (as `benchmarks.adaptive.publish_variants` copies it with other batching)."""
    from pathlib import Path

    from serving.registry import ModelRepository

    repo = ModelRepository(repository)
    config = type(repo.config_proto(model))()
    config.CopyFrom(repo.config_proto(model))
    config.name = CACHED
    config.response_cache.enable = True
    latest = max(repo.list_versions(model))
    files = {"model.pt": Path(repo.model_file(model, latest)).read_bytes()}
    repo.publish(CACHED, files, repo.metadata(model, latest), config=config)


def cache_hit_latency(repository: str, body: bytes, header_length: int, calls: int = 20_000) -> dict:
    """Server-side time per call (µs) of a cache hit and of a computed request, in this process."""
    from serving.options import ServingOptions
    from serving.registry import ModelRepository
    from serving.service import InferenceService
    from serving.workers import LocalWorkerClient, ModelRunner

    async def measure() -> dict:
        repo = ModelRepository(repository)
        models, runners = {}, []
        for name in (CACHED, "fraud"):
            runner = await ModelRunner.load(repository, name)
            runners.append(runner)
            spec, config = repo.load_config(name)
            models[name] = (spec, config, LocalWorkerClient(runner))
        service = InferenceService(models, ServingOptions(repository=repository, response_cache_bytes=64 << 20))
        await service.refresh()
        out = {}
        try:
            for name, kind in ((CACHED, "hit"), ("fraud", "computed")):
                for _ in range(200):  # warm: the first one stores the answer; the JIT's first runs
                    await service.infer(name, None, body, header_length)
                times = np.empty(calls)
                for i in range(calls):
                    t0 = time.perf_counter_ns()
                    await service.infer(name, None, body, header_length)
                    times[i] = time.perf_counter_ns() - t0
                out[kind] = {"p50_us": round(float(np.percentile(times, 50)) / 1e3, 1),
                             "p99_us": round(float(np.percentile(times, 99)) / 1e3, 1), "calls": calls}
            stats = service.recorder.take()
            out["hits_counted"] = stats[(CACHED, "1")].cache_hits
        finally:
            await service.close()
            for runner in runners:
                await runner.close()
        return out

    return asyncio.run(measure())


class OtlpSink:
    """An HTTP/1.1 server on loopback that answers every request 200 after reading its body: a collector
    that costs as little as one can (OTLP/HTTP's exporter only needs the 2xx)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.bytes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.requests += 1
                self.bytes += length
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")

    def stop(self) -> None:
        self.sock.close()
