"""End to end: the fraud and digits request paths with the native kernels on and off, in one run.

The same repository (the example `fraud` and `digits` models) is served twice by
`fleet up`: once as it comes (compiled kernels) and once with
`FLEET_PURE_PYTHON=1` (the NumPy/orjson/torch references), which every Ray
worker of that cluster inherits. The clusters run in the order native, NumPy, NumPy, native and each
figure is the mean of its two runs, so that neither backend always goes
first. Each is measured with wrk: throughput and
latency at 64 connections, and p50 at 1 connection, for JSON bodies of one
fraud row (30 FP32 values), of 64 fraud rows, and of one 28 x 28 uint8 digits image (resized to
8 x 8 by the server), plus the binary body of that image.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.http as tc

from benchmarks.systems import FleetSystem
from benchmarks.wrk import run_wrk

__all__ = ["BODIES", "write_bodies", "e2e"]

BODIES = ("fraud-json", "fraud-json-64rows", "digits-json", "digits-binary")


def write_bodies(folder: Path, seed: int = 0) -> dict[str, tuple[Path, int | None, str]]:
    """{name: (body file, binary header length or None, model)}: one fraud row, one 28 x 28 digits image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    cases = [("fraud-json", "fraud", "features", "FP32", rng.standard_normal((1, 30)).astype(np.float32), False),
             ("fraud-json-64rows", "fraud", "features", "FP32", rng.standard_normal((64, 30)).astype(np.float32),
              False),
             ("digits-json", "digits", "image", "UINT8", rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), False),
             ("digits-binary", "digits", "image", "UINT8", rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), True)]
    for name, model, tensor, datatype, data, binary in cases:
        item = tc.InferInput(tensor, list(data.shape), datatype)
        item.set_data_from_numpy(data, binary_data=binary)
        body, header_length = tc.InferenceServerClient.generate_request_body([item])
        path = folder / f"{name}.body"
        path.write_bytes(body)
        out[name] = (path, header_length, model)
    return out


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def e2e(duration_s: float = 6.0, log=print) -> dict:
    """Both backends, every body: {"runs": [...], "ratios": {body: native / numpy throughput at 64}}."""
    from training.bootstrap import bootstrap
    from training.digits import bootstrap_digits

    work = Path(tempfile.mkdtemp(prefix="fleet-native-e2e-"))
    repo = work / "repository"
    bootstrap(str(repo), rows=20_000, epochs=2, log=lambda line: None)
    bootstrap_digits(str(repo), log=lambda line: None)
    bodies = write_bodies(work / "bodies")
    runs = []
    for backend, env in (("native", None), ("numpy", "1"), ("numpy", "1"), ("native", None)):
        with _env("FLEET_PURE_PYTHON", env), FleetSystem(str(repo), name=f"fleet-{backend}") as system:
            for name, (path, header_length, model) in bodies.items():
                url = f"{system.url}/v2/models/{model}/infer"
                run_wrk(url, path, header_length, connections=16, duration_s=2)  # warm-up
                peak = run_wrk(url, path, header_length, connections=64, threads=2, duration_s=duration_s)
                one = run_wrk(url, path, header_length, connections=1, threads=1, duration_s=duration_s / 2)
                record = {"backend": backend, "body": name, "throughput_rps_c64": peak.throughput_rps,
                          "p50_ms_c64": peak.latency_ms["p50"], "p99_ms_c64": peak.latency_ms["p99"],
                          "p50_ms_c1": one.latency_ms["p50"], "statuses_c64": peak.statuses}
                runs.append(record)
                log(f"  {backend:6s} {name:14s} {peak.throughput_rps:8.0f} req/s at 64  p99 "
                    f"{peak.latency_ms['p99']:.2f} ms   p50 at 1: {one.latency_ms['p50']:.3f} ms  {peak.statuses}")
    ratios = {}
    for name in bodies:
        a, b = _mean(runs, "native", name), _mean(runs, "numpy", name)
        ratios[name] = {"throughput_c64": round(a["throughput_rps_c64"] / b["throughput_rps_c64"], 3)
                        if b["throughput_rps_c64"] else None,
                        "p50_c1": round(a["p50_ms_c1"] / b["p50_ms_c1"], 3) if b["p50_ms_c1"] else None,
                        "native": a, "numpy": b}
    return {"duration_s": duration_s, "order": "native, numpy, numpy, native (each figure the mean of its two)",
            "runs": runs, "ratios": ratios}


def _mean(runs: list[dict], backend: str, body: str) -> dict:
    mine = [r for r in runs if r["backend"] == backend and r["body"] == body]
    return {k: sum(r[k] for r in mine) / len(mine) for k in ("throughput_rps_c64", "p50_ms_c1", "p99_ms_c64")}


def markdown(result: dict) -> str:
    lines = ["| body | native req/s (64 conn.) | NumPy req/s | ratio | native p50 (1 conn.) | NumPy p50 | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ratio in result["ratios"].items():
        a, b = ratio["native"], ratio["numpy"]
        lines.append(f"| {name} | {a['throughput_rps_c64']:.0f} | {b['throughput_rps_c64']:.0f} | "
                     f"{ratio['throughput_c64']}× | {a['p50_ms_c1']:.3f} ms | {b['p50_ms_c1']:.3f} ms | "
                     f"{ratio['p50_c1']}× |")
    return "\n".join(lines)
