"""A Ray cluster of two nodes on this machine, started as a user does (`ray start`), for tests and benchmarks.

The head listens on 127.0.0.3 and the second node on 127.0.0.2 (every 127.x address is this machine's
loopback; Ray replaces 127.0.0.1 as a node's address with the machine's outward one, so the head cannot use
it). The cluster has its own temp folder and is stopped by killing exactly the processes that hold files in
that folder, never `ray stop` (which stops every Ray on the machine). `kill_node` takes one node away as a
crashed machine would: its raylet, the agents and workers under it, and its log monitor, all by SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from benchmarks.loadgen import LoadResult, Target, open_loop_records

__all__ = ["HEAD", "NODE", "RayNodes", "start_nodes", "processes_under", "kill_node", "descendants",
           "load_with_fault", "FRAUD_TARGET"]

HEAD, NODE = "127.0.0.3", "127.0.0.2"


def processes_under(temp_dir: Path) -> list[int]:
    """The pids holding a file under `temp_dir` open."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd).startswith(str(temp_dir)):
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def _kill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def descendants(pid: int) -> list[int]:
    """`pid`'s descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_node(temp_dir: Path, ip: str) -> list[int]:
    """SIGKILL the node at `ip` of the cluster in `temp_dir`: the processes started for it (its address on their
    command line: the raylet, the log monitor) and everything under them (agents, workers, replicas)."""
    own = [pid for pid in processes_under(temp_dir) if f"node_ip_address={ip}" in _cmdline(pid)
           or f"node-ip-address={ip}" in _cmdline(pid)]
    victims = sorted({*own, *(c for pid in own for c in descendants(pid))})
    _kill(victims)
    return victims


@dataclass
class RayNodes:
    temp_dir: Path
    address: str  # the head's GCS, HEAD:port
    dashboard_url: str

    def stop(self) -> None:
        for _ in range(3):
            pids = processes_under(self.temp_dir)
            if not pids:
                break
            _kill(pids)
            time.sleep(1.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_start(args: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, str]:
    """`ray start args` with its output in `log`: the daemons it leaves running would hold a pipe open forever."""
    with open(log, "a") as out:
        code = subprocess.run(["ray", "start", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=120).returncode
    return code, log.read_text()[-3000:]


def start_nodes(cwd: Path, env: dict, gcs_port: int, dashboard_port: int, *, cpus: int = 2,
                temp_dir: Path | None = None, second: bool = True) -> RayNodes | None:
    """Start the head and the second node; None when the head could not start (most likely a port taken
    meanwhile: the caller picks other ports; `ray-start.log` in `cwd` says). `env`: the venv's `ray` first on PATH."""
    temp = temp_dir or Path(f"/tmp/ray-nodes-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    log = cwd / "ray-start.log"
    nodes = RayNodes(temp, f"{HEAD}:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    code, said = _ray_start(["--head", f"--node-ip-address={HEAD}", f"--port={gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--num-cpus={cpus}",
                             f"--temp-dir={temp}", "--disable-usage-stats"], cwd, env, log)
    if code != 0:
        nodes.stop()
        return None
    if not second:
        return nodes
    code, said = _ray_start([f"--address={nodes.address}", f"--node-ip-address={NODE}", f"--num-cpus={cpus}",
                             f"--temp-dir={temp}"], cwd, env, log)
    if code != 0:
        nodes.stop()
        raise RuntimeError(f"ray start (second node) failed:\n{said}")
    return nodes


FRAUD_TARGET = Target("/v2/models/fraud/infer", orjson.dumps(
    {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]}),
    {"Content-Type": "application/json"})


def load_with_fault(host: str, port: int, fault, rate: float = 200.0, duration_s: float = 10.0, at_s: float = 3.0,
                    seed: int = 5) -> tuple[float, np.ndarray, LoadResult]:
    """Open-loop load of one-row fraud requests on host:port, `fault()` called (on a thread) `at_s` into it.
    Returns (the fault's time on the records' clock, the records (`open_loop_records`), the result)."""

    async def scenario():
        loop = asyncio.get_running_loop()
        timer = loop.call_later(at_s, loop.run_in_executor, None, fault)
        try:
            records, result = await open_loop_records(host, port, [FRAUD_TARGET], rate, duration_s, seed=seed,
                                                      max_connections=32, timeout_s=30)
        finally:
            timer.cancel()
        return at_s - 0.005, records, result  # (the schedule starts 5 ms after the call)

    return asyncio.run(scenario())
