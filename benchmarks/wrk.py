"""Closed-loop load with Debian's `wrk`, read back exactly through a Lua `done()` hook.

`lua/report.lua` POSTs one body file over `connections` keep-alive connections
(each sends its next request when the previous answer arrives) and prints one
`WRK_JSON {...}` line: wrk's own counters, its latency percentiles (µs, over
every completed response whatever its status) and per-status counts summed over
wrk's threads. Those counts are kept in each thread's Lua state by `response()`
and copied into the main state in `done()` with `thread:get("statuses")`, which
copies Lua tables in wrk 4.1.0. Defining `response()` makes wrk parse every
answer into Lua, which costs a little client CPU; the status counts are worth it.

wrk takes whole seconds for -d and --timeout: `duration_s` is rounded and
`timeout_s` rounded up, each to at least 1 s. wrk is closed loop, so its
latencies hide server stalls (coordinated omission); use `benchmarks.loadgen.open_loop`
when the question is latency at a given rate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.load import LoadResult, count_2xx

__all__ = ["REPORT_SCRIPT", "ALTERNATE_SCRIPT", "WrkError", "parse_report", "run_wrk",
           "wrk_available", "wrk_command", "run_alternating", "run_alternating_bodies", "parse_phases", "phase_pairs"]

REPORT_SCRIPT = Path(__file__).resolve().parent / "lua" / "report.lua"
ALTERNATE_SCRIPT = Path(__file__).resolve().parent / "lua" / "alternate.lua"
_MARKER = "WRK_JSON "
_PHASES = "WRK_PHASES "
_TRANSPORT_ERRORS = ("connect", "read", "write", "timeout")


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no WRK_JSON report."""


def wrk_available() -> bool:
    """Whether a `wrk` executable is on PATH."""
    return shutil.which("wrk") is not None


def wrk_command(
    url: str,
    body_file: str | Path,
    header_length: int | None = None,
    connections: int = 64,
    threads: int = 2,
    duration_s: float = 10.0,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> list[str]:
    """The wrk argv `run_wrk` runs (threads capped at connections, whole seconds)."""
    if connections < 1 or threads < 1:
        raise ValueError(f"connections and threads must be >= 1, got connections={connections} threads={threads}")
    if not duration_s > 0 or not timeout_s > 0:
        raise ValueError(f"duration_s and timeout_s must be > 0 s, got {duration_s} and {timeout_s}")
    argv = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}",
        f"-d{max(1, round(duration_s))}s", "--timeout", f"{max(1, math.ceil(timeout_s))}s",
        "-s", str(REPORT_SCRIPT),
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv += [url, "--", str(body_file)]
    if header_length is not None:
        argv.append(str(int(header_length)))
    return argv


def parse_report(output: str, connections: int) -> LoadResult:
    """The LoadResult in wrk's stdout (the last WRK_JSON line); WrkError if there is none."""
    lines = [line for line in output.splitlines() if line.startswith(_MARKER)]
    if not lines:
        raise WrkError("wrk printed no WRK_JSON line")
    report = json.loads(lines[-1][len(_MARKER):])
    requests = int(report["requests"])
    duration_s = float(report["duration_us"]) / 1e6
    statuses = {str(code): int(n) for code, n in sorted(report["statuses"].items())}
    if requests:
        latency = {key: None if v is None else float(v) / 1e3 for key, v in report["latency_us"].items()}
    else:  # wrk reports 0 for an empty histogram; no data is not zero latency
        latency = {key: None for key in report["latency_us"]}
    errors = {kind: int(report["errors"][kind]) for kind in _TRANSPORT_ERRORS if report["errors"].get(kind)}
    return LoadResult(
        tool="wrk",
        mode="closed",
        connections=connections,
        rate_rps=None,
        duration_s=duration_s,
        requests=requests,
        throughput_rps=count_2xx(statuses) / duration_s if duration_s > 0 else 0.0,
        latency_ms=latency,
        statuses=statuses,
        errors=errors,
        versions={str(v): int(n) for v, n in (report.get("versions") or {}).items()},
    )


def run_wrk(
    url: str,
    body_file: str | Path,
    header_length: int | None = None,
    connections: int = 64,
    threads: int = 2,
    duration_s: float = 10.0,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
    count_versions: bool = False,
) -> LoadResult:
    """POST `body_file` to `url` with wrk for `duration_s` over `connections` connections.

    With `header_length` the body is a KServe v2 binary-tensor request: the
    request carries `Inference-Header-Content-Length: <header_length>` and
    `Content-Type: application/octet-stream`; without it, `application/json`.
    `headers` are added to every request (a Content-Type here wins). A response
    slower than `timeout_s` counts as errors["timeout"] and is not in the latencies. With `count_versions`
    every 200 answer's "model_version" is counted (`LoadResult.versions`; wrk then reads each body).
    """
    if not wrk_available():
        raise WrkError("wrk is not installed (not on PATH): run `make wrk`")
    if not Path(body_file).is_file():
        raise FileNotFoundError(f"body file {body_file} does not exist")
    argv = wrk_command(url, body_file, header_length, connections, threads, duration_s, timeout_s, headers)
    env = {**os.environ, "WRK_COUNT_VERSIONS": "1"} if count_versions else None
    return _run(argv, duration_s, timeout_s, lambda out: parse_report(out, connections), "WRK_JSON", env)


def _run(argv: list[str], duration_s: float, timeout_s: float, parse, report: str, env=None):
    """Run wrk and `parse` its stdout; WrkError (with the command and the output's tails) when it overruns its
    duration and timeout by 30 s, or prints no usable `report` line."""
    budget_s = max(1, round(duration_s)) + max(1, math.ceil(timeout_s)) + 30
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=budget_s, check=False, env=env)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {budget_s} s: {' '.join(argv)}") from exc
    try:
        return parse(proc.stdout)
    except (WrkError, ValueError, KeyError) as exc:
        raise WrkError(
            f"wrk exited with {proc.returncode} and no usable {report} report ({exc}); command: {' '.join(argv)}\n"
            f"stderr tail:\n{_tail(proc.stderr)}\nstdout tail:\n{_tail(proc.stdout)}"
        ) from exc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"


def parse_phases(output: str) -> dict:
    """{"phases": {k: {"2xx": n, "other": n}}, "errors": n} from `lua/alternate.lua`'s WRK_PHASES line."""
    lines = [line for line in output.splitlines() if line.startswith(_PHASES)]
    if not lines:
        raise WrkError("wrk printed no WRK_PHASES line")
    doc = json.loads(lines[-1][len(_PHASES):])
    return {"phases": {int(k): {"2xx": int(v["2xx"]), "other": int(v["other"])} for k, v in doc["phases"].items()},
            "errors": int(doc["errors"])}


def phase_pairs(phases: dict[int, dict]) -> list[tuple[int, int]]:
    """[(answers to path A, answers to path B)] of each complete pair of phases (2j, 2j + 1): phase k went to A
    when k % 4 is 0 or 3 (A B B A ...). The last phase wrk ran is cut short by its end and left out, as is the
    lead-in (k < 0); so is a pair with a phase that saw no answer at all (the server stalled or stopped)."""
    last = max((k for k in phases if k >= 0), default=-1)
    pairs = []
    for j in range(0, last - 1, 2):  # phases j and j + 1, both before the last one
        first, second = (phases.get(k, {}).get("2xx", 0) for k in (j, j + 1))
        if first and second:
            pairs.append((first, second) if j % 4 == 0 else (second, first))
    return pairs


def run_alternating(base_url: str, body_file: str | Path, path_a: str, path_b: str, duration_s: float,
                    phase_s: float, connections: int = 64, threads: int = 2, lead_s: float = 3.0,
                    timeout_s: float = 10.0, header_a: tuple[str, str] | None = None,
                    headers: dict[str, str] | None = None) -> dict:
    """POST `body_file` (JSON) to `path_a` and `path_b` of `base_url` in turn over the same `connections`, by
    wall-clock phases of `phase_s` (A B B A A B B A ...; `path_b` during the first `lead_s`), for `duration_s`;
    `parse_phases`'s answer counts per phase. One wrk run: the connections, and so where the kernel placed them
    among the server's processes, are the same for both paths. `header_a` (name, value): a header only the
    requests to `path_a` carry (the paths may then be equal); `headers`: on every request (a Content-Type and
    Inference-Header-Content-Length here send binary-tensor bodies)."""
    argv, start = _phased(ALTERNATE_SCRIPT, duration_s, phase_s, connections, threads, lead_s, timeout_s)
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv += [base_url + path_a, "--", str(body_file), path_a, path_b, repr(start), repr(float(phase_s))]
    if header_a is not None:
        argv.append(f"{header_a[0]}: {header_a[1]}")
    return _run(argv, duration_s, timeout_s, parse_phases, "WRK_PHASES")


def run_alternating_bodies(url: str, json_file: str | Path, binary_file: str | Path, header_length: int,
                           duration_s: float, phase_s: float, connections: int = 64, threads: int = 2,
                           lead_s: float = 3.0, timeout_s: float = 10.0) -> dict:
    """`run_alternating` with two bodies of the same request to one `url`: phase A posts `binary_file` (a
    binary-tensor body, its Inference-Header-Content-Length `header_length`), phase B `json_file`."""
    argv, start = _phased(ALTERNATE_SCRIPT, duration_s, phase_s, connections, threads, lead_s, timeout_s)
    argv += [url, "--", "bodies", str(json_file), str(binary_file), str(int(header_length)), repr(start), repr(float(phase_s))]
    return _run(argv, duration_s, timeout_s, parse_phases, "WRK_PHASES")


def _phased(script: Path, duration_s: float, phase_s: float, connections: int, threads: int, lead_s: float,
            timeout_s: float) -> tuple[list[str], float]:
    """(wrk's argv up to the URL, running `script`; the CLOCK_MONOTONIC time of phase 0, which the script reads
    from the same clock) of a phased run."""
    if not wrk_available():
        raise WrkError("wrk is not installed (not on PATH): run `make wrk`")
    if phase_s <= 0 or duration_s <= lead_s + 4 * phase_s:
        raise ValueError(f"phase_s must be > 0 and duration_s longer than lead_s + 4 phases, got {duration_s}")
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", f"{max(1, math.ceil(timeout_s))}s", "-s", str(script)]
    return argv, time.monotonic() + lead_s
