"""Serve one TorchScript file from a real Triton Inference Server (pytriton).

Run by ``.venv-triton/bin/python`` (``make triton-env``), never by fleet's own
venv: pytriton 0.7.0 needs numpy<2, and its Python-backend stub only loads
under Debian's interpreter. So this script imports only pytriton, numpy, torch
and the standard library, never fleet's packages. ``benchmarks.triton_process``
launches it; the integration tests and the benchmark's "Triton with dynamic
batching" baseline talk to it with ``tritonclient``.

    .venv-triton/bin/python benchmarks/triton_server.py \
        --model-file fraud.pt --model-name fraud \
        --input features:FP32:30 --output logits:FP32:2 \
        --max-batch-size 256 --max-queue-delay-us 1000 \
        --http-port 8100 --grpc-port 8101 --metrics-port 8102

Dims exclude the batch dimension; several dims are comma-separated
(``image:FP32:1,8,8``), ``-1`` marks a variable one. Prints
``TRITON READY http://127.0.0.1:<port>`` once the model answers readiness,
and stops the server cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

HOST = "127.0.0.1"
# Triton's datatype names (KServe v2) and the NumPy dtypes torch can take.
DATATYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# pytriton guards these with a random token by default; statistics stay open so a
# benchmark can read the batch sizes Triton executed (the server listens on
# loopback only).
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 5

_LOG = logging.getLogger("triton_server")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton datatype, dims without batch."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def dtype(self) -> type[np.generic]:
        return DATATYPES[self.datatype]


def parse_tensor_spec(text: str) -> TensorSpec:
    """Parse ``NAME:DATATYPE:DIMS`` (e.g. ``features:FP32:30``, ``image:UINT8:1,-1,-1``)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(
            f"tensor spec {text!r} must be NAME:DATATYPE:DIMS, e.g. features:FP32:30"
        )
    name, datatype, dims_text = parts[0], parts[1].upper(), parts[2]
    if datatype not in DATATYPES:
        raise argparse.ArgumentTypeError(
            f"datatype {parts[1]!r} in {text!r} is not supported; use one of {', '.join(DATATYPES)}"
        )
    try:
        dims = tuple(int(d) for d in dims_text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"dims {dims_text!r} in {text!r} must be comma-separated integers (-1 for variable)"
        ) from None
    if any(d == 0 or d < -1 for d in dims):
        raise argparse.ArgumentTypeError(f"dims {dims_text!r} in {text!r} must be positive or -1")
    return TensorSpec(name, datatype, dims)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-file", type=Path, required=True, help="TorchScript file (torch.jit.save)")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--input", dest="inputs", type=parse_tensor_spec, action="append", required=True,
                        help="NAME:DATATYPE:DIMS, repeatable, in the model's positional order")
    parser.add_argument("--output", dest="outputs", type=parse_tensor_spec, action="append", required=True,
                        help="NAME:DATATYPE:DIMS, repeatable, in the order the model returns them")
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--max-queue-delay-us", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=1, help="model instances (CPU), each one thread")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="pytriton workspace, must not exist (default: under ~/.cache/pytriton)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_queue_delay_us < 0:
        parser.error(f"--max-queue-delay-us must be >= 0, got {args.max_queue_delay_us}")
    if args.instances < 1:
        parser.error(f"--instances must be >= 1, got {args.instances}")
    if not args.model_file.is_file():
        parser.error(f"--model-file {args.model_file} does not exist")
    return args


def make_infer_fn(
    model: torch.jit.ScriptModule, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> Callable[..., dict[str, np.ndarray]]:
    """A pytriton batch callable: named input arrays in, named output arrays out.

    Inputs go to the model positionally in ``inputs`` order; its result (one
    tensor, or a tuple/list of them) maps positionally onto ``outputs``.
    """
    input_names = [spec.name for spec in inputs]

    @batch
    def infer(**arrays: np.ndarray) -> dict[str, np.ndarray]:
        # torch.from_numpy wants writable, contiguous memory; copy only a batch that is not.
        tensors = [torch.from_numpy(np.require(arrays[name], requirements=["C", "W"])) for name in input_names]
        with torch.inference_mode():
            result = model(*tensors)
        results = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(results) != len(outputs):
            raise ValueError(
                f"model returned {len(results)} tensors but {len(outputs)} outputs were declared"
            )
        return {
            spec.name: value.detach().cpu().numpy().astype(spec.dtype, copy=False)
            for spec, value in zip(outputs, results)
        }

    return infer


def warm_up(model: torch.jit.ScriptModule, inputs: list[TensorSpec], max_batch_size: int) -> None:
    """Run the model on zero batches (size 1 and max) so the first timed request
    does not pay TorchScript's profiling runs. Done in-process, so Triton's
    statistics count only real requests; -1 dims become 1."""
    for rows in (1, 1, max_batch_size, max_batch_size):
        tensors = [
            torch.from_numpy(np.zeros((rows, *(max(d, 1) for d in spec.dims)), dtype=spec.dtype))
            for spec in inputs
        ]
        try:
            with torch.inference_mode():
                model(*tensors)
        except Exception as exc:  # a model may reject zeros; serving still works
            _LOG.warning("warm-up skipped: model failed on a zero batch of %d rows: %s", rows, exc)
            return


def _wait_model_ready(http_port: int, model_name: str, timeout_s: float) -> None:
    url = f"http://{HOST}:{http_port}/v2/models/{model_name}/ready"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {model_name!r} not ready at {url} after {timeout_s:.0f} s")
        time.sleep(0.1)


_signalled = False


def _raise_interrupt(signum: int, _frame: object) -> NoReturn:
    # One path for SIGINT and SIGTERM: pytriton's serve() loop handles
    # KeyboardInterrupt by stopping tritonserver and cleaning its workspace.
    # Later signals are ignored so they cannot cut that shutdown short.
    global _signalled
    _signalled = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)

    # One intra-op thread per instance: Triton's instances give the parallelism,
    # as in fleet's own CPU workers, so the baseline is like for like.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    model = torch.jit.load(str(args.model_file), map_location="cpu").eval()
    warm_up(model, args.inputs, args.max_batch_size)

    config = TritonConfig(
        http_address=HOST,
        http_port=args.http_port,
        grpc_address=HOST,
        grpc_port=args.grpc_port,
        metrics_address=HOST,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=EXIT_TIMEOUT_S,
    )
    triton = Triton(
        config=config,
        workspace=args.workspace,
        security_config=TritonSecurityConfig(restricted_endpoints=RESTRICTED_ENDPOINTS),
    )
    try:
        triton.bind(
            model_name=args.model_name,
            # A sequence of callables is how pytriton makes several instances.
            infer_func=[make_infer_fn(model, args.inputs, args.outputs) for _ in range(args.instances)],
            inputs=[Tensor(name=s.name, dtype=s.dtype, shape=s.dims) for s in args.inputs],
            outputs=[Tensor(name=s.name, dtype=s.dtype, shape=s.dims) for s in args.outputs],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.run()  # starts tritonserver and loads the model; serve() below then only waits
        _wait_model_ready(args.http_port, args.model_name, READY_TIMEOUT_S)
        print(f"TRITON READY http://{HOST}:{args.http_port}", flush=True)
        triton.serve()  # returns after a signal (it handles KeyboardInterrupt itself) or a crash
    except KeyboardInterrupt as exc:
        _LOG.info("%s received, stopping Triton", exc or "SIGINT")
    finally:
        triton.stop()
    if not _signalled:
        _LOG.error("tritonserver or the model's proxy died; see the log above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
