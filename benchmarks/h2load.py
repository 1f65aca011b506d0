"""gRPC load with nghttp2's `h2load` (Debian's nghttp2-client): a C client, as wrk is for HTTP/1.1.

A unary gRPC call is an HTTP/2 POST to `/<service>/<method>` with `content-type: application/grpc`
and a body of one length-prefixed message (a zero flag byte, a 4-byte big-endian length, the
serialized protobuf). h2load posts that body over `clients` connections, each with at most
`streams` calls in flight (closed loop), for `duration_s`, and writes every call's latency to
`--log-file`, from which the percentiles are computed.

h2load knows HTTP, not gRPC: a call that fails still answers HTTP 200 with its error in the
`grpc-status` trailer. So a run proves nothing by itself: `grpc_body` requests are checked
once with a real gRPC client before the load (`check_body`), and the caller compares the
server's own success count with the calls h2load completed.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.load import LoadResult, summarize

__all__ = ["H2loadError", "h2load_available", "grpc_body", "run_h2load"]


class H2loadError(RuntimeError):
    """h2load is missing, failed, or printed no summary."""


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def grpc_body(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")


def run_h2load(host: str, port: int, method_path: str, message: bytes, *, clients: int = 64, streams: int = 1,
               duration_s: float = 10.0, warm_up_s: float = 1.0, threads: int = 1,
               headers: dict[str, str] | None = None) -> LoadResult:
    """Call `method_path` (`/inference.GRPCInferenceService/ModelInfer`) with `message` for `duration_s`."""
    if not h2load_available():
        raise H2loadError("h2load is not installed: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body, log = Path(tmp, "body"), Path(tmp, "log.tsv")
        body.write_bytes(grpc_body(message))
        argv = ["h2load", f"http://{host}:{port}{method_path}", "-c", str(clients), "-m", str(streams),
                "-t", str(threads), "-D", f"{max(1, round(duration_s))}", "--warm-up-time", f"{max(1, round(warm_up_s))}",
                "-d", str(body),
                "--log-file", str(log), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + warm_up_s + 60)
        counts = _REQUESTS.search(proc.stdout)
        finished = _FINISHED.search(proc.stdout)
        if proc.returncode != 0 or counts is None or finished is None:
            raise H2loadError(f"h2load exited with {proc.returncode}: {' '.join(argv)}\n{proc.stdout[-2000:]}\n"
                              f"{proc.stderr[-2000:]}")
        latencies, statuses = [], {}
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                statuses[parts[1]] = statuses.get(parts[1], 0) + 1
                latencies.append(float(parts[2]) * 1000.0)  # µs -> ns
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    _, _, done, succeeded, failed, errored, timeout = (int(g) for g in counts.groups())
    # The counts are h2load's over the measured period (after the warm-up); the log may also hold warm-up calls.
    return LoadResult(tool="h2load", mode="closed", connections=clients * streams, rate_rps=None,
                      duration_s=seconds, requests=done, throughput_rps=succeeded / seconds if seconds else 0.0,
                      latency_ms=summarize(np.asarray(latencies)), statuses=statuses,
                      errors={k: v for k, v in (("errored", errored), ("timeout", timeout), ("failed", failed)) if v})
