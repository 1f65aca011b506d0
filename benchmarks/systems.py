"""The systems a benchmark run measures, behind one interface: start, url, stats, stop.

- `FleetSystem`: fleet itself, started with `fleet up` (its own state dir and
  ports) or an already running one (`--url`);
- `TritonSystem`: a real Triton server (pytriton's tritonserver 2.51) serving the
  same TorchScript file with its dynamic batcher;
- `BaselineSystem`: the plain uvicorn + Starlette server and the default Ray
  Serve deployment from `benchmarks.baselines`.

Every system serves the same model file under the same model name and takes
the same request bodies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from cluster.ports import free_ports

__all__ = ["System", "FleetSystem", "TritonSystem", "BaselineSystem", "fetch_stats", "stats_delta"]


class System:
    """Base: a named server that answers KServe v2 at `url`."""

    name = "system"
    url = ""
    label = ""

    def start(self) -> "System":
        return self

    def stop(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "url": self.url}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def fetch_stats(url: str, model: str) -> dict | None:
    """Triton's statistics document for `model` (fleet and Triton both serve it), or None."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as response:
            doc = json.loads(response.read())
    except (OSError, ValueError):
        return None
    entries = doc.get("model_stats") or []
    return entries[0] if entries else None


def _flat(entry: dict | None) -> dict:
    if not entry:
        return {"batches": {}}
    inf = entry.get("inference_stats", {})
    out = {k: (inf.get(k, {}).get("count", 0), inf.get(k, {}).get("ns", 0))
           for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
    out["inference_count"] = entry.get("inference_count", 0)
    out["execution_count"] = entry.get("execution_count", 0)
    out["batches"] = {int(b["batch_size"]): b.get("compute_infer", {}).get("count", 0)
                      for b in entry.get("batch_stats", [])}
    return out


def stats_delta(before: dict | None, after: dict | None) -> dict:
    """What the server itself saw between two stats documents: batch sizes, queue/compute split."""
    b, a = _flat(before), _flat(after)
    if not a.get("success"):
        return {}
    requests = a["success"][0] - b.get("success", (0, 0))[0]
    executions = a["execution_count"] - b.get("execution_count", 0)
    rows = a["inference_count"] - b.get("inference_count", 0)

    def per_request_ms(key: str) -> float | None:
        count = a[key][0] - b.get(key, (0, 0))[0]
        ns = a[key][1] - b.get(key, (0, 0))[1]
        return round(ns / count / 1e6, 4) if count else None

    batches = {size: n - b["batches"].get(size, 0) for size, n in a["batches"].items()}
    return {
        "requests": requests,
        "executions": executions,
        "avg_batch_rows": round(rows / executions, 2) if executions else None,
        "request_ms": per_request_ms("success"),
        "queue_ms": per_request_ms("queue"),
        "compute_ms": sum(filter(None, (per_request_ms(k) for k in
                                        ("compute_input", "compute_infer", "compute_output")))) or None,
        "batch_sizes": {size: n for size, n in sorted(batches.items()) if n > 0},
    }


class FleetSystem(System):
    """fleet, via the CLI a user runs (`fleet up` ... `fleet down`), or already running at `url`."""

    def __init__(self, repository: str | None = None, *, url: str | None = None, name: str = "fleet",
                 flags: tuple[str, ...] = (), label: str = "fleet", startup_timeout_s: float = 300):
        self.name, self.label = name, label
        self.repository = repository
        self.flags = flags
        self.url = url or ""
        self._external = url is not None
        self._state_dir: str | None = None
        self._timeout = startup_timeout_s
        self.dashboard_url: str | None = None  # Ray's dashboard of a cluster this system started

    def _fleet(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cli = [sys.executable, "-m", "cluster.cli", *args]
        return subprocess.run(cli, capture_output=True, text=True, timeout=timeout)

    def start(self) -> "FleetSystem":
        if self._external:
            return self
        self._state_dir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
        port, dashboard, grpc_port = free_ports(3)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        result = self._fleet("up", "--repository", str(self.repository), "--port", str(port),
                             "--grpc-port", str(grpc_port),
                             "--dashboard-port", str(dashboard), "--state-dir", self._state_dir, *self.flags,
                             timeout=self._timeout)
        if result.returncode != 0:
            log = Path(self._state_dir, "fleet.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"fleet up failed ({self.flags}):\n{result.stdout}\n{result.stderr}\n{tail}")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._external or self._state_dir is None:
            return
        self._fleet("down", "--state-dir", self._state_dir, timeout=180)
        shutil.rmtree(self._state_dir, ignore_errors=True)
        self._state_dir = None

    def describe(self) -> dict:
        return {**super().describe(), "flags": list(self.flags), "external": self._external}


class TritonSystem(System):
    """A real Triton Inference Server (pytriton 0.7.0, tritonserver 2.51, Python backend on CPU)."""

    def __init__(self, model_file: str, model: str, inputs, outputs, *, max_batch_size: int,
                 max_queue_delay_us: int, instances: int = 1):
        self.name, self.label = "triton", f"Triton 2.51 (pytriton, {instances} instance(s), dynamic batching)"
        self._args = (model_file, model, inputs, outputs)
        self._kw = dict(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, instances=instances)
        self._proc = None

    def start(self) -> "TritonSystem":
        from benchmarks.triton_process import TritonProcess

        self._proc = TritonProcess.start(*self._args, **self._kw)
        self.url = f"http://{self._proc.http_url}"
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def describe(self) -> dict:
        return {**super().describe(), **self._kw}


class BaselineSystem(System):
    """A server from `benchmarks.baselines` (plain HTTP or default Ray Serve)."""

    def __init__(self, name: str, label: str, factory):
        self.name, self.label = name, label
        self._factory = factory
        self._server = None

    def start(self) -> "BaselineSystem":
        self._server = self._factory()
        self._server.start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
