"""Launch and stop a real Triton Inference Server that serves one TorchScript file.

fleet's integration tests (the ``triton`` worker backend) and the benchmark's
"Triton with dynamic batching" baseline both need a real server. It runs
``benchmarks/triton_server.py`` under the separate ``.venv-triton``
interpreter (pytriton needs numpy<2 and Debian's Python), in its own process
group, and is reached with ``tritonclient`` like any Triton::

    with TritonProcess.start("fraud.pt", "fraud",
                             inputs=[("features", "FP32", (30,))],
                             outputs=[("logits", "FP32", (2,))]) as triton:
        client = tritonclient.http.InferenceServerClient(triton.http_url)

It runs in the main venv (stdlib, tritonclient and `cluster.ports`); only the
server script runs under `.venv-triton`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import tritonclient.http

from cluster.ports import free_ports

__all__ = ["TensorSpec", "TritonProcess", "triton_python"]

# (name, Triton datatype, dims without the batch dimension), e.g. ("features", "FP32", (30,)).
TensorSpec = tuple[str, str, tuple[int, ...]]

_REPO_ROOT = Path(__file__).resolve().parents[1]
_SERVER_SCRIPT = Path(__file__).resolve().with_name("triton_server.py")
_HOST = "127.0.0.1"
_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 40
# pytriton's own shutdown (unload the model, stop tritonserver, clean the
# workspace) takes 4-8 s; past this the whole group is killed.
_STOP_GRACE_S = 30.0


def triton_python() -> str:
    """Path of the interpreter of ``.venv-triton``, the venv that can run Triton.

    Raises:
        FileNotFoundError: the venv is missing; ``make triton-env`` creates it.
    """
    python = _REPO_ROOT / ".venv-triton" / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"{python} does not exist: the Triton server runs in its own venv "
            f"(pytriton needs numpy<2 and Debian's /usr/bin/python3). "
            f"Create it with `cd {_REPO_ROOT} && make triton-env`."
        )
    return str(python)


class TritonProcess:
    """A running Triton server subprocess; build it with :meth:`start`."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        model_name: str,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        log_path: Path,
        workdir: Path,
    ) -> None:
        self._popen = popen
        self.model_name = model_name
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_path = log_path
        self._workdir = workdir
        self._stopped = False
        self._stub_dirs: set[Path] = set()

    @classmethod
    def start(
        cls,
        model_file: str | os.PathLike[str],
        model_name: str,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        *,
        max_batch_size: int = 256,
        max_queue_delay_us: int = 1000,
        instances: int = 1,
        python: str | None = None,
        ports: tuple[int, int, int] | None = None,
        timeout_s: float = 120.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> TritonProcess:
        """Start Triton serving ``model_file`` and return once the model is ready.

        Args:
            model_file: a TorchScript file (``torch.jit.save``).
            model_name: the name clients infer against.
            inputs, outputs: ``(name, datatype, dims)`` in the model's positional
                order; datatype is Triton's (``"FP32"``), dims exclude the batch.
            max_batch_size, max_queue_delay_us: Triton's dynamic batcher settings.
            instances: model instances, each on one CPU thread.
            python: interpreter to run the server; default :func:`triton_python`.
            ports: ``(http, grpc, metrics)``; default three free loopback ports.
            timeout_s: how long to wait for the model to be ready, in seconds.
            log_path: where the server's stdout/stderr go; default a private
                temporary file that :meth:`stop` deletes.

        Raises:
            RuntimeError: the server exited or was not ready within ``timeout_s``;
                the message ends with the tail of its log.
        """
        python = python or triton_python()
        http_port, grpc_port, metrics_port = ports or free_ports(3)
        workdir = Path(tempfile.mkdtemp(prefix="fleet-triton-"))
        log_file = Path(log_path).resolve() if log_path is not None else workdir / "triton.log"
        command = [
            python, str(_SERVER_SCRIPT),
            "--model-file", str(Path(model_file).resolve()),
            "--model-name", model_name,
            *(arg for spec in inputs for arg in ("--input", _format_spec(spec))),
            *(arg for spec in outputs for arg in ("--output", _format_spec(spec))),
            "--max-batch-size", str(max_batch_size),
            "--max-queue-delay-us", str(max_queue_delay_us),
            "--instances", str(instances),
            "--http-port", str(http_port),
            "--grpc-port", str(grpc_port),
            "--metrics-port", str(metrics_port),
            # pytriton copies tritonserver (~30 MB) into its workspace; keep it
            # where stop() removes it even if the server had to be killed.
            "--workspace", str(workdir / "workspace"),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # The main venv's variables must not leak into the other interpreter.
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(name, None)
        try:
            with open(log_file, "wb") as log:
                popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    start_new_session=True,  # own process group: stop() reaches tritonserver and its stubs
                )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        process = cls(popen, model_name, http_port, grpc_port, metrics_port, log_file, workdir)
        try:
            process._wait_ready(timeout_s)
            # Noted now: if tritonserver crashes, its stubs exit before stop() can look.
            process._stub_dirs.update(_stub_model_dirs(process.pid))
        except BaseException:
            process.stop()
            raise
        return process

    @property
    def pid(self) -> int:
        """Pid of the launcher script, also the id of the server's process group."""
        return self._popen.pid

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint, as ``tritonclient.http`` wants it."""
        return f"{_HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` wants it."""
        return f"{_HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of Triton's Prometheus metrics."""
        return f"http://{_HOST}:{self.metrics_port}/metrics"

    def is_running(self) -> bool:
        """Whether the launcher (and so the server it supervises) is still up."""
        return self._popen.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Stop the server and every process it started; safe to call twice.

        SIGTERM goes to the launcher only: its pytriton shutdown unloads the model
        and stops tritonserver in order (about 5 s; a SIGTERM to the whole group
        kills pytriton's helper processes first and the Python-backend stub fails
        while finalising). Whatever is left in the process group once the
        launcher has exited, or after ``grace_s`` seconds, is killed with SIGKILL.
        """
        if self._stopped:
            return
        self._stopped = True
        pid = self._popen.pid  # start_new_session made it the group leader: pgid == pid
        # Triton copies model.py into /tmp/folderXXXXXX per model; a killed stub, and
        # now and then a clean unload, leaves it behind, so note them while alive.
        self._stub_dirs.update(_stub_model_dirs(pid))
        if self._popen.returncode is None:
            terminate_leader(pid, grace_s)
        _kill_group(pid)
        self._popen.wait()
        for stub_dir in self._stub_dirs:
            shutil.rmtree(stub_dir, ignore_errors=True)
        # Shared-memory regions of the Python backend are named after the launcher's pid.
        for region in Path("/dev/shm").glob(f"pytrtion{pid}-*"):
            with contextlib.suppress(OSError):
                region.unlink()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonProcess(model={self.model_name!r}, http={self.http_url}, pid={self.pid}, {state})"

    def _log_heading(self) -> str:
        # A log in the private workdir is deleted by stop(): do not point at it.
        if self.log_path.is_relative_to(self._workdir):
            return "end of its log:"
        return f"end of its log {self.log_path}:"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = tritonclient.http.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0)
        try:
            while True:
                code = self._popen.poll()
                if code is not None:
                    raise RuntimeError(
                        f"Triton server for {self.model_name!r} exited with code {code} before it was ready; "
                        f"{self._log_heading()}\n{self.log_tail()}"
                    )
                try:
                    if client.is_model_ready(self.model_name):
                        return
                except Exception:  # refused or reset while the server comes up
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Triton server for {self.model_name!r} not ready after {timeout_s:.0f} s; "
                        f"{self._log_heading()}\n{self.log_tail()}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()


def _format_spec(spec: TensorSpec) -> str:
    name, datatype, dims = spec
    return f"{name}:{datatype}:{','.join(str(d) for d in dims)}"


def terminate_leader(pid: int, grace_s: float) -> None:
    """SIGTERM our child `pid` and wait up to `grace_s` for it to exit, without reaping it:
    a group leader's pid, hence the group id, stays reserved until the group is killed,
    so no reused id is hit."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while not _has_exited(pid) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL_S / 4)


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, leaving it unreaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # already reaped
    return info is not None


def _kill_group(pgid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL every process in the group until only the unreaped leader is left.

    pytriton's multiprocessing helpers exit just after the launcher and end as
    zombies of init; waiting for init to reap them (about a second here) means
    a caller that still finds the group has found a real leak. Live processes
    past ``timeout_s`` raise; zombies that init never reaps hold no port,
    memory or file, so they do not.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        members = _group_members(pgid)
        live = [pid for pid, zombie in members.items() if not zombie]
        if live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        elif set(members) <= {pgid}:
            return
        if time.monotonic() > deadline:
            if live:
                raise RuntimeError(f"processes {live} of group {pgid} survive SIGKILL")
            return
        time.sleep(0.05)


def _stub_model_dirs(pgid: int) -> list[Path]:
    """Folders Triton extracted model.py into for the stubs still alive in the group."""
    dirs = []
    for pid, zombie in _group_members(pgid).items():
        if zombie:
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            path = Path(os.fsdecode(arg))
            # triton_python_backend_stub /tmp/folderXXXXXX/<version>/model.py ...
            folder = path.parent.parent
            if path.name == "model.py" and folder.parent == Path("/tmp") and folder.name.startswith("folder"):
                dirs.append(folder)
    return dirs


def _group_members(pgid: int) -> dict[int, bool]:
    """Pids in process group ``pgid``, each mapped to whether it is a zombie (Linux /proc)."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid:
            members[int(stat.parent.name)] = state == "Z"
    return members
