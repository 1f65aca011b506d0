"""The benchmark report: machine and git facts, ratios against the baselines, goals, files.

`write_report` writes `report.json` (every figure), `summary.md` (the tables the
README quotes) and the PNG plots into the run's folder.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from benchmarks.plots import plot_batch_sizes, plot_latency_vs_throughput, plot_step_load

__all__ = ["machine", "git_sha", "find_run", "ratios_and_goals", "write_report"]


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kb / 2**20, 1)
        info["load_average"] = os.getloadavg()
    except (OSError, StopIteration, ValueError):
        pass
    return info


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def find_run(runs: list[dict], system: str, body: str = "json", connections: int | None = None) -> dict | None:
    for run in runs:
        if run["system"] == system and run["body"] == body and run.get("mode") == "closed" and (
                connections is None or run.get("connections") == connections):
            return run
    return None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _lat(run: dict | None, key: str):
    return None if run is None else run["latency_ms"].get(key)


def _thr(run: dict | None):
    return None if run is None else run["throughput_rps"]


def ratios_and_goals(runs: list[dict], open_runs: list[dict], peak_connections: int = 64,
                     inprocess: dict | None = None, binary_json: dict | None = None) -> tuple[dict, list[dict]]:
    """fleet's figures as ratios to each baseline, and the issue's goals, met or missed by how much.
    `binary_json`: `scenarios.binary_vs_json`'s turns, which decide the binary-against-JSON goal (met when the
    whole 95 % interval is at or above 1); without it, the ratio of the two closed-loop points."""
    fleet_peak = find_run(runs, "fleet", "json", peak_connections)
    fleet_one = find_run(runs, "fleet", "json", 1)
    ratios: dict = {}
    for other in sorted({r["system"] for r in runs} - {"fleet"}):
        peak, one = find_run(runs, other, "json", peak_connections), find_run(runs, other, "json", 1)
        ratios[other] = {
            f"throughput_c{peak_connections}": _ratio(_thr(fleet_peak), _thr(peak)),
            "p50_c1": _ratio(_lat(fleet_one, "p50"), _lat(one, "p50")),
            f"p99_c{peak_connections}": _ratio(_lat(fleet_peak, "p99"), _lat(peak, "p99")),
        }
    if inprocess and fleet_peak:
        # The compute limit: the bare forward pass, at batch 1 and at the batch size fleet averaged.
        batches = inprocess.get("batches", {})
        one = batches.get("1", {})
        ratios["inprocess"] = {
            "throughput_c64_vs_batch1_calls": _ratio(_thr(fleet_peak), one.get("rows_per_s")),
            "p50_c1_vs_batch1_call": _ratio(_lat(fleet_one, "p50"), (one.get("p50_us") or 0) / 1000 or None),
        }
    goals = []

    def goal(name: str, value, target, met: bool | None, unit: str = "") -> None:
        goals.append({"goal": name, "value": value, "target": target, "unit": unit,
                      "met": met, "gap": None if met or value is None or target is None else round(value - target, 3)})

    triton = ratios.get("triton", {}).get(f"throughput_c{peak_connections}")
    goal(f"throughput at {peak_connections} connections vs Triton", triton, 1.25,
         None if triton is None else triton >= 1.25, "x")
    serve = ratios.get("serve_default", {}).get(f"throughput_c{peak_connections}")
    goal(f"throughput at {peak_connections} connections vs default Ray Serve", serve, 8.0,
         None if serve is None else serve >= 8.0, "x")
    p50 = _lat(fleet_one, "p50")
    goal("p50 latency at 1 connection", p50, 1.0, None if p50 is None else p50 <= 1.0, "ms")
    fleet_open = next((r for r in open_runs if r["system"] == "fleet"), None)
    triton_open = next((r for r in open_runs if r["system"] == "triton"), None)
    f99, t99 = _lat(fleet_open, "p99"), _lat(triton_open, "p99")
    goal(f"p99 at fleet's sustained rate ({fleet_open and fleet_open['rate_rps']:.0f}/s) vs Triton's p99"
         if fleet_open else "p99 at fleet's sustained rate vs Triton", _ratio(f99, t99), 1.0,
         None if f99 is None or t99 is None else f99 < t99, "x")
    if binary_json and binary_json.get("ci95"):
        low, high = binary_json["ci95"]
        goal(f"binary vs JSON throughput at {binary_json['connections']} connections (taking turns by "
             f"{binary_json['phase_s']:g} s phases, {binary_json['n']} pairs; 95 % interval {low}-{high})",
             binary_json["mean"], 1.0, low >= 1.0, "x")
    else:
        binary = find_run(runs, "fleet", "binary", peak_connections)
        b = _ratio(_thr(binary), _thr(fleet_peak))
        goal(f"binary vs JSON throughput at {peak_connections} connections", b, 1.0, None if b is None else b >= 1.0,
             "x")
    return ratios, goals


def summary_markdown(report: dict) -> str:
    lines = ["| system | connections | body | req/s | p50 ms | p99 ms | avg batch | non-2xx |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for run in report["closed_loop"]:
        non2xx = sum(n for s, n in run["statuses"].items() if not s.startswith("2"))
        lat = run["latency_ms"]
        lines.append(
            f"| {run['system']} | {run['connections']} | {run['body']} | {run['throughput_rps']:.0f} | "
            f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {run['server'].get('avg_batch_rows') or '-'} | {non2xx} |")
    lines += ["", "| goal | value | target | met |", "|---|---:|---:|---|"]
    for g in report["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else f"no (gap {g['gap']})")
        lines.append(f"| {g['goal']} | {_fmt(g['value'])} {g['unit']} | {g['target']} {g['unit']} | {met} |")
    if report.get("open_loop"):
        lines += ["", "| system | offered req/s | achieved req/s | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
        for run in report["open_loop"]:
            lat = run["latency_ms"]
            lines.append(f"| {run['system']} | {run['rate_rps']:.0f} | {run['throughput_rps']:.0f} | "
                         f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {_fmt(lat['max'])} |")
    if report.get("adaptive"):
        adaptive = report["adaptive"]
        lines += ["", f"Adaptive batching: `{adaptive.get('model')}`, target p99 {adaptive['target_ms']:g} ms, "
                  f"median of {adaptive.get('repeats')} interleaved runs of {adaptive.get('step_s')} s per step",
                  "", "| batching policy | offered req/s | achieved req/s | p50 ms | p99 ms | p99 of each run | "
                  "machine CPU busy | CPU ms / request | avg batch |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for policy, steps in adaptive["series"].items():
            for s in steps:
                lat = s["latency_ms"]
                runs = ", ".join(_fmt(v) for v in s.get("p99_ms_runs", []))
                lines.append(f"| {policy} | {s['rate_rps']:.0f} | {_fmt(s['throughput_rps'])} | "
                             f"{_fmt(lat['p50'])} | {_fmt(lat['p99'])} | {runs} | {_fmt(s.get('cpu_busy'))} | "
                             f"{_fmt(s.get('cpu_ms_per_request'))} | {_fmt(s.get('avg_batch_rows'))} |")
        for v in adaptive.get("goal", {}).get("steps", []):
            extra = f" (CPU per request {v['cpu_ratio']} x adaptive's)" if v.get("cpu_ratio") else ""
            lines.append(f"- at {v['rate_rps']:.0f} req/s, {v['policy']}: {v['verdict']}{extra}")
    if report.get("soak"):
        from benchmarks.soak import soak_markdown

        lines += ["", soak_markdown(report["soak"])]
    if report.get("lifecycle"):
        from benchmarks.lifecycle_report import lifecycle_markdown

        lines += ["", _nested(lifecycle_markdown(report["lifecycle"]))]
    if report.get("logging_cost"):
        from benchmarks.logging_report import cost_markdown

        lines += ["", _nested(cost_markdown(report["logging_cost"]))]
    return "\n".join(lines) + "\n"


def _nested(markdown: str) -> str:
    """A scenario's own summary inside this one: its headings one level down."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, report: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report.setdefault("created_at", datetime.datetime.now(datetime.timezone.utc).isoformat())
    paths = [out_dir / "report.json", out_dir / "summary.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(summary_markdown(report))
    paths.append(plot_latency_vs_throughput(report["closed_loop"], out_dir / "latency_vs_throughput.png"))
    batches = {}
    for run in report["closed_loop"]:
        if run["server"].get("batch_sizes") and run["body"] == "json":
            dist = batches.setdefault(f"{run['system']}", {})
            for size, n in run["server"]["batch_sizes"].items():
                dist[int(size)] = dist.get(int(size), 0) + n
    paths.append(plot_batch_sizes(batches, out_dir / "batch_sizes.png"))
    if report.get("adaptive"):
        paths.append(plot_step_load(report["adaptive"]["series"], report["adaptive"]["target_ms"],
                                    out_dir / "adaptive_batching.png"))
    return paths
