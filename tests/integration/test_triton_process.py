"""A real Triton server (pytriton, own venv) serves a TorchScript file and stops cleanly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton_http

from benchmarks.triton_process import TritonProcess

pytestmark = pytest.mark.integration


def _save_linear(path: Path) -> torch.jit.ScriptModule:
    torch.manual_seed(1234)
    model = torch.jit.script(torch.nn.Linear(4, 2).eval())
    model.save(str(path))
    return model


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # What a new server would do: TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_triton_serves_torchscript_and_stops_cleanly(tmp_path: Path) -> None:
    model_file = tmp_path / "linear.pt"
    model = _save_linear(model_file)
    rows = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(rows)).numpy()

    triton = TritonProcess.start(
        model_file,
        "linear",
        inputs=[("x", "FP32", (4,))],
        outputs=[("y", "FP32", (2,))],
        max_batch_size=8,
        max_queue_delay_us=100,
    )
    try:
        assert triton.is_running()
        client = triton_http.InferenceServerClient(triton.http_url)
        try:
            metadata = client.get_server_metadata()
            assert metadata["name"] == "triton"
            assert "binary_tensor_data" in metadata["extensions"]

            request = triton_http.InferInput("x", list(rows.shape), "FP32")
            request.set_data_from_numpy(rows, binary_data=True)
            result = client.infer(
                "linear", [request], outputs=[triton_http.InferRequestedOutput("y", binary_data=True)]
            )
            got = result.as_numpy("y")
            assert got.shape == (3, 2) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

            config = client.get_model_config("linear")
            assert config["max_batch_size"] == 8
            assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
        finally:
            client.close()
    finally:
        triton.stop()

    assert not triton.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(triton.pid, 0)
    assert _group_is_gone(triton.pid), "tritonserver or a Python-backend stub outlived stop()"
    assert _port_is_free(triton.http_port)
    assert _port_is_free(triton.grpc_port)
    triton.stop()  # idempotent


def test_start_reports_a_server_that_dies(tmp_path: Path) -> None:
    not_a_model = tmp_path / "garbage.pt"
    not_a_model.write_bytes(b"not torchscript")
    with pytest.raises(RuntimeError, match="exited with code") as excinfo:
        TritonProcess.start(not_a_model, "garbage", [("x", "FP32", (4,))], [("y", "FP32", (2,))], timeout_s=60)
    # The log tail tells the user why: torch could not load the file.
    assert "torch" in str(excinfo.value).lower() or "zip" in str(excinfo.value).lower()
