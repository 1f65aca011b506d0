"""The baseline servers, live: the plain uvicorn process and the default Ray Serve deployment.

Each is started once, on its own repository, and must answer fleet's request
bodies (JSON and binary) with exactly what the TorchScript file computes, turn
a bad body into a 400 with a message, and leave no process and no bound port
behind once stopped. No fleet cluster is involved.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as httpclient

from benchmarks.baselines import ManagedServer, PlainHttpServer, ServeDefaultServer
from benchmarks.bodies import request_bodies
from training.bootstrap import bootstrap

pytestmark = pytest.mark.integration

_ROWS = 4
_SERVERS = {"plain_http": PlainHttpServer, "serve_default": ServeDefaultServer}


@pytest.fixture(scope="module")
def model_repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline-repo")
    bootstrap(str(root), rows=2000, epochs=1, seed=5, num_threads=1, log=lambda *a, **k: None)
    return root


@pytest.fixture(scope="module", params=sorted(_SERVERS))
def server(request, model_repository: Path) -> Iterator[ManagedServer]:
    baseline = _SERVERS[request.param](model_repository, "fraud").start()
    try:
        yield baseline
    finally:
        baseline.stop()


def _expected(repository: Path, rows: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(repository / "fraud" / "1" / "model.pt")).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(rows)).numpy()


def _rows_of(body: bytes, header_length: int | None) -> np.ndarray:
    if header_length is None:
        return np.asarray(orjson.loads(body)["inputs"][0]["data"], dtype=np.float32).reshape(_ROWS, 30)
    return np.frombuffer(body[header_length:], dtype="<f4").reshape(_ROWS, 30).copy()


@pytest.mark.parametrize("kind", ["json", "binary"])
def test_the_real_bodies_get_the_models_answer(server: ManagedServer, model_repository: Path, kind: str) -> None:
    body, header_length = request_bodies(str(model_repository), "fraud", rows=_ROWS)[kind]
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    answer = httpx.post(f"{server.url}/v2/models/fraud/infer", content=body, headers=headers, timeout=30)

    assert answer.status_code == 200, answer.text
    answer_length = answer.headers.get("inference-header-content-length")
    assert (answer_length is None) == (kind == "json")  # binary asked, binary given
    result = httpclient.InferenceServerClient.parse_response_body(
        answer.content, header_length=None if answer_length is None else int(answer_length)
    )
    got = result.as_numpy("probability")
    assert got.shape == (_ROWS, 1)
    np.testing.assert_allclose(got, _expected(model_repository, _rows_of(body, header_length)), rtol=0, atol=1e-6)
    assert result.get_response()["model_name"] == "fraud"


def test_tritonclient_works_against_it_unmodified(server: ManagedServer, model_repository: Path) -> None:
    rows = np.random.default_rng(11).standard_normal((3, 30)).astype(np.float32)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    try:
        features = httpclient.InferInput("features", list(rows.shape), "FP32")
        features.set_data_from_numpy(rows, binary_data=True)
        result = client.infer("fraud", [features], model_version="1")
    finally:
        client.close()
    np.testing.assert_allclose(result.as_numpy("probability"), _expected(model_repository, rows), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b'{"inputs": [{"name": "features"', {}, "malformed JSON"),
        (b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}', {},
         "does not match"),
        (b'{"inputs": []}' + b"\0" * 8, {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length"),
    ],
    ids=["truncated-json", "wrong-shape", "header-length-past-the-body"],
)
def test_a_malformed_body_is_a_400_that_says_why(server: ManagedServer, body: bytes, headers, message: str) -> None:
    answer = httpx.post(f"{server.url}/v2/models/fraud/infer", content=body, headers=headers, timeout=30)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_another_path_is_a_404_in_json(server: ManagedServer) -> None:
    answer = httpx.post(f"{server.url}/v2/models/nope/infer", content=b"{}", timeout=30)
    assert answer.status_code == 404
    assert "nope" in answer.json()["error"]


def test_stop_leaves_no_process_and_frees_the_port(server: ManagedServer) -> None:
    tracked = _processes_of(server.pid)
    if isinstance(server, ServeDefaultServer):
        # The processes worth checking are there: Ray's own and the replica (in a group of its own).
        names = " ".join(cmd.split(" ")[0].rsplit("/", 1)[-1] for _, cmd in tracked.values())
        assert "raylet" in names and "gcs_server" in names and "ray::ServeReplica" in names, names
        assert any(server.ray_temp_dir and str(server.ray_temp_dir) in cmd for _, cmd in tracked.values())

    server.stop()

    leaked = {pid: cmd for pid, (start, cmd) in tracked.items() if _alive_since(pid) == start}
    assert not leaked, f"still running after stop(): {leaked}"
    assert server.leftovers() == []
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)
    assert _port_is_free(server.port)


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, start time in ticks) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _alive_since(pid: int) -> int | None:
    """The start time of `pid` if it runs (not a zombie), else None."""
    stat = _stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[3]


def _processes_of(leader: int) -> dict[int, tuple[int, str]]:
    """{pid: (start time, command line)} of the leader's descendants and its process group, while they run."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    ours = {pid for pid, s in stats.items() if s[2] == leader and s[0] != "Z"}
    seen, frontier = {leader}, {leader}
    while frontier:  # Ray's workers are the raylet's children, each in a process group of its own
        frontier = {pid for pid, s in stats.items() if s[1] in frontier and s[0] != "Z"} - seen
        seen |= frontier
    ours |= seen
    out = {}
    for pid in ours:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (stats[pid][3], cmd)
    return out


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a new server would: TIME_WAIT is no owner
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
