"""TorchScript backend: torch.jit.load, inference_mode, warm-up, CUDA when present.

Batches run one at a time on a dedicated thread, off the event loop, so the
next batch can be received and assembled while one computes. When the replica is lightly
loaded (the batch carries one request: `lone_request`) and that thread is idle, a batch
of a cheap model on the CPU (its batches take at most `fleet.inline_max_us`, default
500 µs, of thread time, a moving average over its last ones) runs on the event loop
instead: handing a batch over and back costs two thread wake-ups and the GIL's
hand-over, about 0.2 ms of CPU in one process, more than such a model computes (a
one-row `fraud` batch takes 0.1-0.25 ms of thread time in a busy replica). Under load
the thread keeps the loop free to read the next requests (inline there measured 5 %
slower). The loop waits for the model meanwhile, so a model whose cost varies widely
with its input should set the parameter to 0. On CUDA, inputs go through pinned host
buffers with non_blocking copies, always on the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
import warnings
from typing import Mapping

import numpy as np
import torch

from serving.backends.base import lone_request, positional_order
from serving.errors import BackendError, RepositoryError
from serving.model_config import INLINE_PARAM, ModelSpec, TensorSpec
from serving.preprocess import model_inputs

__all__ = ["TorchScriptBackend", "pick_device"]

_log = logging.getLogger("fleet.backends.torchscript")
# A CPU model's batch of one request runs on the event loop when its batches take at most this much thread time
# (the moving average `run_s`, known from `_MEASURED` batches on; `fleet.inline_max_us` per model) and no batch
# is on its thread: the loop then waits about as long as handing the batch to the thread and back would cost it.
INLINE_MAX_US = 500.0
_MEASURED = 3
# Zero-copy views of request bodies are read-only; the model never writes its inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_TORCH_DTYPES = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}


def pick_device(kind: str = "auto") -> str:
    """'cuda' when the model may use a GPU and one is visible, else 'cpu'."""
    if kind != "cpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class TorchScriptBackend:
    """One TorchScript model version on one device."""

    def __init__(self, spec: ModelSpec, version: int, model_file, *, device: str | None = None,
                 threads: int | None = None):
        for t in spec.inputs + spec.outputs:
            if t.datatype not in _TORCH_DTYPES:
                raise RepositoryError(f"model {spec.name!r}: TorchScript cannot take {t.datatype} tensor {t.name!r}")
        self.spec = spec
        self.version = version
        self.device = device or pick_device(spec.instance_kind)
        self._file = model_file
        self._threads = threads
        self._inputs = positional_order(model_inputs(spec))  # what the file takes, after any preprocessing
        self._outputs = positional_order(spec.outputs)
        self._module: torch.jit.ScriptModule | None = None
        self._pinned: dict[str, torch.Tensor] = {}
        self.run_s = 0.0  # a moving average of the thread time (seconds) a batch takes in `_run`
        self._timed = 0  # batches `run_s` has seen
        self.inline_max_s = float(spec.parameters.get(INLINE_PARAM, INLINE_MAX_US)) / 1e6
        self._on_thread = 0  # batches handed to the thread and not back yet
        # One thread: batches execute in order; torch's intra-op threads parallelise each.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"torch-{spec.name}")

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        try:
            module = torch.jit.load(self._file, map_location=self.device)
        except Exception as exc:  # a corrupt or non-TorchScript file
            raise RepositoryError(f"model {self.spec.name!r} version {self.version}: cannot load TorchScript: {exc}") from exc
        module.eval()
        self._module = module
        self._warm_up()
        self.run_s, self._timed = 0.0, 0  # the first calls profile the graph and run far slower than traffic's will
        _log.info("loaded %s v%s on %s", self.spec.name, self.version, self.device)

    def _example(self, t: TensorSpec, rows: int) -> np.ndarray:
        dims = tuple(1 if d == -1 else d for d in t.dims)
        shape = ((rows,) if self.spec.max_batch_size > 0 else ()) + dims
        return np.zeros(shape, dtype=t.dtype)

    def _warm_up(self) -> None:
        # The first calls of a TorchScript module profile and optimise the graph;
        # do them now, at the batch sizes traffic will use, not on a user's request.
        sizes = sorted({1, max(1, self.spec.max_batch_size)}) if self.spec.max_batch_size else [1]
        for rows in sizes:
            for _ in range(3):
                self._run({t.name: self._example(t, rows) for t in self._inputs})

    def runs_inline(self) -> bool:
        """Whether the next batch runs on the event loop (see INLINE_MAX_US)."""
        return (self._on_thread == 0 and self._timed >= _MEASURED and self.run_s <= self.inline_max_s
                and self.device == "cpu" and lone_request.get())

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.runs_inline():
            return self._run(inputs)
        self._on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)
        finally:
            self._on_thread -= 1

    @staticmethod
    async def run_many(batches: list[tuple["TorchScriptBackend", Mapping[str, np.ndarray]]]) -> list:
        """Several backends' batches in one hop to the first one's thread: each one's outputs or its exception."""

        def run() -> list:
            out: list = []
            for backend, inputs in batches:
                try:
                    out.append(backend._run(inputs))
                except Exception as exc:  # noqa: BLE001 - one version's failure is its own
                    out.append(exc)
            return out

        for backend, _ in batches:  # (a batch of one of them on the loop meanwhile would run beside it)
            backend._on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(batches[0][0]._executor, run)
        finally:
            for backend, _ in batches:
                backend._on_thread -= 1

    def _to_device(self, name: str, arr: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(arr)
        if self.device == "cpu":
            return tensor
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < tensor.numel() or buf.dtype != tensor.dtype:
            buf = torch.empty(max(tensor.numel(), 1), dtype=tensor.dtype).pin_memory()
            self._pinned[name] = buf
        staged = buf[: tensor.numel()].view(tensor.shape)
        staged.copy_(tensor)
        return staged.to(self.device, non_blocking=True)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise BackendError(f"model {self.spec.name!r} version {self.version} is not loaded")
        start = time.thread_time()  # the thread's own time: waiting for the GIL under load is not the batch's
        try:
            return self._forward(inputs)
        finally:
            spent = time.thread_time() - start
            self.run_s = spent if self._timed == 0 else self.run_s + 0.1 * (spent - self.run_s)
            self._timed += 1

    def _forward(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._to_device(t.name, inputs[t.name]) for t in self._inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            tensors = [result.get(t.name) for t in self._outputs]
        elif isinstance(result, (tuple, list)):
            tensors = list(result)
        else:
            raise BackendError(f"model {self.spec.name!r} returned {type(result).__name__}, not tensors")
        if len(tensors) != len(self._outputs) or any(not isinstance(x, torch.Tensor) for x in tensors):
            raise BackendError(
                f"model {self.spec.name!r} returned {len(tensors)} tensors; its config declares "
                f"{[t.name for t in self._outputs]}"
            )
        outputs = {}
        for t, tensor in zip(self._outputs, tensors):
            if tensor.device.type != "cpu":
                tensor = tensor.to("cpu", non_blocking=True)
            outputs[t.name] = tensor
        if self.device != "cpu":
            torch.cuda.current_stream().synchronize()
        return {name: tensor.numpy().astype(spec_dtype, copy=False)
                for (name, tensor), spec_dtype in zip(outputs.items(), (t.dtype for t in self._outputs))}

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._module = None

    async def health(self) -> str | None:
        return None  # in this process: it answers as long as it is loaded

    def describe(self) -> dict:
        return {"backend": "torchscript", "device": self.device, "threads": torch.get_num_threads(),
                "pid": os.getpid()}
