"""Baseline "the raw model in-process": the limit for compute, and the codec every Python server pays.

The same TorchScript file as fleet serves, called directly on random inputs of
the model's shape under `torch.inference_mode()`, one batch size at a time,
after a warm-up: no HTTP, no codec, no queue. rows/s at the largest batch is
the most any server can get out of these cores with this many torch threads.

Beside it, the cost of fleet's codec for one 1-row request, measured on the
real request bodies (`benchmarks.bodies`): decode + validate + encode, JSON and
binary. A server without batching pays it per request on top of the model.

    python -m benchmarks.baselines.inprocess --repository R --model fraud
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
import orjson
import torch

from benchmarks.baselines._model import load_torchscript
from benchmarks.bodies import request_bodies
from serving.backends.base import positional_order
from serving.protocol import decode_request, encode_response
from serving.validation import validate_request

__all__ = ["main", "measure_inprocess"]

DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 256)
_WARM_UP_CALLS = 20
_WARM_UP_FRACTION = 0.1  # of duration_s, on top of the warm-up calls


def _timed(call: Callable[[], object], duration_s: float) -> np.ndarray:
    """Call `call` back to back for `duration_s` seconds; the duration of each call in ns."""
    times = []
    deadline = time.perf_counter_ns() + int(duration_s * 1e9)
    while True:
        start = time.perf_counter_ns()
        call()
        end = time.perf_counter_ns()
        times.append(end - start)
        if end >= deadline:
            return np.asarray(times, dtype=np.int64)


def _warm_up(call: Callable[[], object], duration_s: float) -> None:
    for _ in range(_WARM_UP_CALLS):
        call()
    _timed(call, duration_s * _WARM_UP_FRACTION)


def _latency_us(times_ns: np.ndarray) -> dict:
    p50, p95, p99 = np.percentile(times_ns, [50, 95, 99]) / 1e3
    return {
        "calls": int(times_ns.size),
        "mean_us": round(float(times_ns.mean()) / 1e3, 3),
        "p50_us": round(float(p50), 3),
        "p95_us": round(float(p95), 3),
        "p99_us": round(float(p99), 3),
    }


def measure_inprocess(
    repository: str,
    model: str,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    duration_s: float = 1.0,
    threads: int = 1,
) -> dict:
    """Time the model's forward pass per batch size, and fleet's codec per 1-row request.

    Returns a JSON-serializable dict: `batches` maps each batch size (as a
    string) to calls, mean/p50/p95/p99 per-call latency in µs and rows/s over
    `duration_s` seconds of back-to-back calls; `codec` maps "json" and
    "binary" to the same latency figures for decode + validate + encode of the
    real body, with each step's mean. torch's intra-op threads are set to
    `threads` for the measurement and restored afterwards.

    Raises ValueError for a batch size outside 1..max_batch_size or a
    non-positive duration or thread count.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    spec, version, module = load_torchscript(repository, model)
    limit = spec.max_batch_size
    bad = [b for b in batch_sizes if b < 1 or (limit > 0 and b > limit) or (limit == 0 and b != 1)]
    if bad or not batch_sizes:
        raise ValueError(f"batch sizes {bad or list(batch_sizes)} are not allowed: use 1..{max(limit, 1)} ({model!r})")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batches = {str(b): _measure_batch(spec, module, b, duration_s) for b in batch_sizes}
        codec = _measure_codec(repository, model, spec, version, module, duration_s)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "baseline": "inprocess",
        "model": model,
        "version": version,
        "threads": threads,
        "duration_s": duration_s,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batches": batches,
        "codec": codec,
    }


def _measure_batch(spec, module: torch.jit.ScriptModule, rows: int, duration_s: float) -> dict:
    rng = np.random.default_rng(rows)
    args = []
    for t in positional_order(spec.inputs):
        shape = ((rows,) if spec.max_batch_size > 0 else ()) + tuple(1 if d == -1 else d for d in t.dims)
        args.append(torch.from_numpy(rng.standard_normal(shape).astype(t.dtype)))

    def call() -> object:
        with torch.inference_mode():
            return module(*args)

    _warm_up(call, duration_s)
    times = _timed(call, duration_s)
    result = _latency_us(times)
    result["rows_per_s"] = round(float(rows * times.size / (times.sum() / 1e9)), 1)
    return result


def _measure_codec(repository: str, model: str, spec, version: int, module, duration_s: float) -> dict:
    return {
        kind: _measure_body(body, header_length, model, spec, version, module, duration_s)
        for kind, (body, header_length) in request_bodies(repository, model, rows=1).items()
    }


def _measure_body(
    body: bytes, header_length: int | None, model: str, spec, version: int, module, duration_s: float
) -> dict:
    """decode + validate + encode of one body, the model's real answer encoded back."""
    tag = str(version)
    checked = validate_request(decode_request(body, header_length), spec)
    with torch.inference_mode():
        result = module(*(torch.from_numpy(checked.inputs[t.name].copy()) for t in positional_order(spec.inputs)))
    result = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    arrays = {t.name: x.numpy() for t, x in zip(positional_order(spec.outputs), result)}
    steps = np.zeros(3, dtype=np.int64)  # ns spent in decode, validate, encode

    def call() -> object:
        t0 = time.perf_counter_ns()
        request = decode_request(body, header_length)
        t1 = time.perf_counter_ns()
        valid = validate_request(request, spec)
        t2 = time.perf_counter_ns()
        outputs = [(o.name, o.datatype, arrays[o.name], binary) for o, binary in valid.outputs]
        encoded = encode_response(model, tag, outputs, request_id=request.id)
        steps[:] += (t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
        return encoded

    _warm_up(call, duration_s)
    steps[:] = 0
    times = _timed(call, duration_s)
    figures = _latency_us(times)
    decode_us, validate_us, encode_us = steps / times.size / 1e3
    figures.update(
        request_bytes=len(body),
        decode_mean_us=round(float(decode_us), 3),
        validate_mean_us=round(float(validate_us), 3),
        encode_mean_us=round(float(encode_us), 3),
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.inprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="model repository root")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--duration-s", type=float, default=1.0, help="seconds of calls per batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    figures = measure_inprocess(args.repository, args.model, args.batch_sizes, args.duration_s, args.threads)
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
