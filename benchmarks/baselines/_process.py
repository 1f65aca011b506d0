"""A baseline server run as `python -m <module>` in a process group of its own.

Start, wait until `GET /v2/health/ready` answers 200, stop with SIGTERM to the
leader and then SIGKILL to whatever is left: the way `benchmarks/triton_process.py`
manages Triton. Ray puts each worker (Serve controller, proxy, replicas) in a
process group of its own, so "what is left" is every live process in the
leader's group, or carrying the server's marker in its environment (which every
descendant inherits), or naming its private work folder on its command line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from benchmarks.triton_process import terminate_leader
from cluster.ports import free_port

__all__ = ["ManagedServer", "is_ready"]

_HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL_INTERVAL_S = 0.2
_LOG_TAIL_LINES = 40
_MARKER_VAR = "FLEET_BASELINE_ID"


class ManagedServer:
    """A baseline server subprocess serving one model of a repository on one loopback port."""

    module: ClassVar[str]  # what `python -m` runs
    label: ClassVar[str]  # for messages
    start_timeout_s: ClassVar[float] = 60.0
    stop_grace_s: ClassVar[float] = 10.0

    def __init__(self, repository: str | os.PathLike[str], model: str, port: int | None = None) -> None:
        self.repository = str(Path(repository).resolve())
        self.model = model
        self.port = port or free_port()
        self.workdir: Path | None = None  # private temporary folder, deleted by stop()
        self._popen: subprocess.Popen[bytes] | None = None
        self._marker = f"{_MARKER_VAR}={uuid.uuid4().hex}"
        self._stopped = False

    # -- what subclasses add -------------------------------------------------
    def _extra_args(self, workdir: Path) -> list[str]:
        return []

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        name, _, value = self._marker.partition("=")
        env[name] = value
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    # -- life cycle ----------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:20123``."""
        return f"http://{_HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """Pid of the server process, also the id of its process group."""
        if self._popen is None:
            raise RuntimeError(f"{self.label} was not started")
        return self._popen.pid

    @property
    def log_path(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "server.log"

    def start(self, timeout_s: float | None = None) -> Self:
        """Launch the server and return once it answers `GET /v2/health/ready` with 200.

        Raises RuntimeError when it exits or is not ready within `timeout_s`
        seconds (default: the class's `start_timeout_s`); the message ends with
        the tail of its log.
        """
        if self._popen is not None:
            raise RuntimeError(f"{self.label} was already started (pid {self._popen.pid})")
        workdir = Path(tempfile.mkdtemp(prefix="fleet-bl-"))
        self.workdir = workdir
        command = [
            sys.executable, "-m", self.module,
            "--repository", self.repository, "--model", self.model, "--port", str(self.port),
            *self._extra_args(workdir),
        ]  # fmt: skip
        try:
            with open(workdir / "server.log", "wb") as log:
                self._popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env(),
                    cwd=_REPO_ROOT,
                    start_new_session=True,  # own process group: stop() reaches everything it starts
                )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        try:
            self._wait_ready(self.start_timeout_s if timeout_s is None else timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def leftovers(self) -> list[int]:
        """Live pids of the server's processes (group, environment marker, work folder): [] once stopped."""
        if self._popen is None:
            return []
        folder = os.fsencode(str(self.workdir))
        marker = os.fsencode(self._marker)
        return [pid for pid in _live_pids() if _belongs(pid, self._popen.pid, marker, folder)]

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the server, SIGKILL whatever is left after `grace_s` seconds; safe to call twice."""
        if self._stopped or self._popen is None:
            return
        self._stopped = True
        pid = self._popen.pid
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if self._popen.returncode is None:
            terminate_leader(pid, grace_s)
        deadline = time.monotonic() + 5.0
        while survivors := self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            for other in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: processes {survivors} survive SIGKILL")
            time.sleep(0.05)
        self._popen.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"{type(self).__name__}(model={self.model!r}, url={self.url}, {state})"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._popen.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.label} for {self.model!r} exited with code {code} before it was ready; "
                    f"end of its log:\n{self.log_tail()}"
                )
            if is_ready(self.url):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.label} for {self.model!r} not ready on {self.url} after {timeout_s:.0f} s; "
                    f"end of its log:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)


def is_ready(url: str) -> bool:
    """Whether the server at `url` answers `GET /v2/health/ready` with 200 (no: refused, reset, 404, 503)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2.0) as answer:
            return answer.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _live_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _belongs(pid: int, pgid: int, marker: bytes, folder: bytes) -> bool:
    """Whether `pid` is alive (not a zombie) and in group `pgid`, has `marker` in its environment or `folder`
    on its command line."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state == "Z":
            return False
        if int(pgrp) == pgid or folder in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
        return marker in Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError):
        return False  # exited while we looked, or not ours to read
