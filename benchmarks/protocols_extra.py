"""The response-cache and tracing rows of `python -m benchmarks.protocols`.

- Cache, server side: one process's `InferenceService` over the real `fraud` TorchScript file (a
  `ModelRunner`, the colocated path), the binary request of the throughput runs, timed per call
  (decode, validate, key, lookup, encode: everything but the socket) over `calls` calls of a hit and
  of a computed request. Goal: p50 of a hit <= 0.1 ms.
- Cache, cluster: wrk at 64 connections on `fraud_cached` (the same file, `response_cache { enable:
  true }`; one body, so every request after each replica's first is a hit) against `fraud` (every
  request computed: what a miss costs, less the key and store, about 10 µs), ABBA in one cluster.
  Goal: hits >= 2 x misses.
- Tracing: clusters started with `tracing_sample_ratio` 0 (off) and 1 (every request traced, spans
  sent as OTLP/HTTP to a sink in this process that reads and discards them), off/on/on/off, wrk at
  64 connections on `fraud`. Goals: on >= 0.9 x off.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np

__all__ = ["publish_cached", "cache_hit_latency", "OtlpSink"]

CACHED = "fraud_cached"


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
