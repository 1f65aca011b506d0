"""What the live monitoring benchmarks share: a fleet cluster in this process, its /metrics, its processes' CPU.

- `start_cluster`: `cluster.local.LocalCluster` on free ports (tried again on new ones when a port
  was taken between choosing and binding it, as the integration tests do), its Ray dashboard
  agent on a free port too (`cluster.ports.ray_agent_port`); stop it with `stop()`.
- `metric_values` / `metric_sum`: samples of Prometheus text, by name and labels.
- `ClusterCpu`: the CPU time (user + system, from `/proc/<pid>/stat`) of every process this
  process started, directly or not (Ray's GCS, raylet, dashboard, workers, replicas, the monitor
  actor), less this process itself and load generators (`wrk`): the cluster's CPU over an interval.
  CPU of a process that exits between two readings is lost, so a reading is a lower bound.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass

from cluster.config import FleetSettings
from cluster.local import LocalCluster
from cluster.ports import free_ports, port_taken, ray_agent_port

__all__ = ["start_cluster", "metric_values", "metric_sum", "fetch_text", "ClusterCpu", "CpuReading",
           "descendants", "cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")
_EXCLUDED_NAMES = ("wrk",)


def start_cluster(settings: FleetSettings, attempts: int = 3, log=print) -> tuple[LocalCluster, FleetSettings]:
    """Start a LocalCluster with `settings` on fresh ports; (cluster, the settings it runs with)."""
    for attempt in range(attempts):
        port, dashboard, agent, grpc_port = free_ports(4)
        settings = settings.model_copy(update={"port": port, "dashboard_port": dashboard, "grpc_port": grpc_port})
        cluster = LocalCluster(settings)
        try:
            with ray_agent_port(agent):
                cluster.start()
            return cluster, settings
        except Exception as exc:  # a port taken meanwhile, or Ray's dashboard late on a loaded machine
            cluster.stop()
            if attempt == attempts - 1 or not (port_taken(exc) or "dashboard" in str(exc).lower()):
                raise
            log(f"cluster start failed ({exc}); trying again on other ports")
    raise RuntimeError("unreachable")


def fetch_text(url: str, timeout_s: float = 30.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def metric_values(text: str, name: str, **labels: str) -> list[float]:
    """Every sample of metric `name` in Prometheus text whose labels include `labels` (exact values)."""
    out = []
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            try:
                out.append(float(value))
            except ValueError:
                continue
    return out


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """The sum of `metric_values` (None when there is no such sample)."""
    values = metric_values(text, name, **labels)
    return sum(values) if values else None


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, parent pid, CPU seconds) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces or parentheses: split at the last ')'.
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is the state (field 3); ppid is field 4, utime 14 and stime 15 (1-based, man proc)
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS


def descendants(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds)} of every live descendant of `root` (not `root` itself)."""
    table: dict[int, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        name, _, cpu = table[pid]
        out[pid] = (name, cpu)
        stack.extend(children.get(pid, []))
    return out


def cpu_seconds(pid: int) -> float | None:
    stat = _stat(pid)
    return None if stat is None else stat[2]


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds per process of the cluster at one moment."""

    per_pid: dict[int, tuple[str, float]]

    @property
    def total_s(self) -> float:
        return sum(cpu for _, cpu in self.per_pid.values())


class ClusterCpu:
    """CPU time of the cluster this process started (its descendants less `wrk`)."""

    def __init__(self, root: int | None = None, excluded: tuple[str, ...] = _EXCLUDED_NAMES):
        self.root = root or os.getpid()
        self.excluded = excluded

    def read(self) -> CpuReading:
        return CpuReading({pid: entry for pid, entry in descendants(self.root).items()
                           if not entry[0].startswith(self.excluded)})

    @staticmethod
    def used(before: CpuReading, after: CpuReading) -> float:
        """CPU seconds the cluster used between two readings (processes in both; new ones from 0)."""
        total = 0.0
        for pid, (_, cpu) in after.per_pid.items():
            total += cpu - before.per_pid.get(pid, ("", 0.0))[1]
        return total

    @staticmethod
    def by_name(before: CpuReading, after: CpuReading) -> dict[str, float]:
        """CPU seconds used between two readings per command name (ray::Ingress, raylet, ...)."""
        out: dict[str, float] = {}
        for pid, (name, cpu) in after.per_pid.items():
            out[name] = out.get(name, 0.0) + cpu - before.per_pid.get(pid, ("", 0.0))[1]
        return {name: round(v, 2) for name, v in sorted(out.items(), key=lambda kv: -kv[1])}
