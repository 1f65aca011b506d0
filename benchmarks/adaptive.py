"""The adaptive batching scenario: one model under three batching policies, an open-loop load in steps.

The model is `fraud_large`: the fraud MLP at hidden width 1024 and depth 3
(2.1 M parameters), whose batch of one costs about 0.3-0.9 ms on one core here
and a batch of 64 about 3.7 ms: a model where the batch size decides how much
CPU the model takes. (For the 64-wide `fraud` model a forward pass costs about
26 µs, the HTTP work dominates and no batching policy changes much.) The three
copies of the same file differ only in their config.pbtxt:

- `fraud_large_fixed_100us`: `max_queue_delay_microseconds: 100`;
- `fraud_large_fixed_8ms`: `max_queue_delay_microseconds: 8000`;
- `fraud_large_adaptive`: `latency_target_ms` (25 ms by default).

Each step offers one rate (Poisson arrivals, latency from the intended send
time) to each policy in turn, `repeats` times, interleaved (A, B, C, A, B, C,
...) so that all three see the same machine; a step's figure is the median over
its repeats. Besides latency and throughput, every run records the share of
the machine's CPU in use (/proc/stat, load generator included, the same for all
three at one rate) and turns it into CPU milliseconds per request: a policy
that spends more CPU on the same requests wastes throughput the machine could
serve.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from benchmarks.loadgen import open_loop, run
from benchmarks.scenarios import Bodies, _host_port, cool_down, infer_path
from benchmarks.systems import System, fetch_stats, stats_delta
from benchmarks.wrk import run_wrk
from serving.model_config import LATENCY_TARGET_PARAM
from serving.registry import ModelRepository

__all__ = ["LARGE_MODEL", "POLICIES", "publish_policies", "publish_variants", "machine_cpu", "adaptive_scenario", "adaptive_goal"]

LARGE_MODEL = "fraud_large"
LARGE_PARAMS = {"hidden": 1024, "depth": 3, "epochs": 1}
# name -> (dynamic_batching max_queue_delay_us, adaptive: latency_target_ms set)
POLICIES = {
    f"{LARGE_MODEL}_fixed_100us": (100, False),
    f"{LARGE_MODEL}_fixed_8ms": (8000, False),
    f"{LARGE_MODEL}_adaptive": (1000, True),
}
STEP_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # of the 100 µs policy's closed-loop peak
CPU_WASTE = 1.1  # a policy meeting the target with >= 10 % more CPU per request than adaptive wastes throughput


def publish_policies(repo: ModelRepository, target_ms: float, rows: int = 20_000, seed: int = 0) -> None:
    """Train `fraud_large` once (the fraud bootstrap, wider) and publish it under each policy's name."""
    import tempfile

    from training.bootstrap import TrainParams, bootstrap

    scratch = tempfile.mkdtemp(prefix="fraud-large-")
    bootstrap(scratch, rows=rows, seed=seed, params=TrainParams(**LARGE_PARAMS), log=lambda line: None)
    publish_variants(ModelRepository(scratch), "fraud", repo, POLICIES, target_ms,
                     note=f"{LARGE_MODEL}: fraud at hidden 1024, depth 3")


def publish_variants(source: ModelRepository, model: str, repo: ModelRepository,
                     variants: dict[str, tuple[int, bool]], target_ms: float, note: str) -> None:
    """Copies of source's `model` version 1 (file and metadata) into `repo`, one per batching policy.

    `variants` maps a name to (max_queue_delay_us, adaptive); adaptive ones get `latency_target_ms`.
    """
    data = Path(source.model_file(model, 1)).read_bytes()
    metadata = {**source.metadata(model, 1), "copy_of": note}  # its reference statistics too
    base = source.config_proto(model)
    for name, (delay_us, adaptive) in variants.items():
        config = type(base)()
        config.CopyFrom(base)
        config.name = name
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
        del config.dynamic_batching.preferred_batch_size[:]
        if adaptive:
            config.parameters[LATENCY_TARGET_PARAM].string_value = str(target_ms)
        repo.publish(name, {"model.pt": data}, metadata, config=config)


def machine_cpu(path: str = "/proc/stat") -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs; differences of two readings give the busy share."""
    with open(path, "rb") as f:
        fields = [float(v) for v in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _one_run(system: System, bodies: Bodies, model: str, rate: float, step_s: float, arrivals: str,
             seed: int) -> dict:
    host, port = _host_port(system.url)
    before = fetch_stats(system.url, model)
    cpu0 = machine_cpu()
    result = run(open_loop(host, port, [bodies.target("json", model)], rate, step_s, arrivals=arrivals, seed=seed,
                           max_connections=256))
    cpu1 = machine_cpu()
    busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1e-9)
    time.sleep(1.2)  # the replicas push their statistics about once a second
    server = stats_delta(before, fetch_stats(system.url, model))
    ok = sum(n for s, n in result.statuses.items() if s.startswith("2"))
    cores = os.cpu_count() or 1
    return {**result.to_dict(), "model": model, "offered_rps": rate, "seed": seed, "cpu_busy": round(busy, 3),
            "cpu_ms_per_request": round(busy * cores * result.duration_s * 1000 / ok, 4) if ok else None,
            "server": server}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _summary(model: str, rate: float, runs: list[dict]) -> dict:
    return {
        "model": model, "rate_rps": rate, "repeats": len(runs),
        "throughput_rps": _median(r["throughput_rps"] for r in runs),
        "latency_ms": {k: _median(r["latency_ms"][k] for r in runs) for k in ("p50", "p90", "p99", "max")},
        "p99_ms_runs": [r["latency_ms"]["p99"] for r in runs],
        "cpu_busy": _median(r["cpu_busy"] for r in runs),
        "cpu_ms_per_request": _median(r["cpu_ms_per_request"] for r in runs),
        "avg_batch_rows": _median(r["server"].get("avg_batch_rows") for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
        "non_2xx": sum(n for r in runs for s, n in r["statuses"].items() if not s.startswith("2")),
    }


def peak_rate(system: System, bodies: Bodies, model: str, duration_s: float) -> float:
    """Closed-loop throughput of `model` at 64 connections (wrk), to place the steps."""
    url = system.url + infer_path(model)
    run_wrk(url, bodies.file("json"), None, connections=16, duration_s=2)
    return run_wrk(url, bodies.file("json"), None, connections=64, threads=2, duration_s=duration_s).throughput_rps


def adaptive_scenario(system: System, bodies: Bodies, step_s: float, repeats: int, target_ms: float,
                      arrivals: str = "poisson", rates: list[float] | None = None, log=print) -> dict:
    """Every policy at every step, `repeats` interleaved runs each; a policy that cannot keep up stops there."""
    peak = None
    if rates is None:
        peak = peak_rate(system, bodies, f"{LARGE_MODEL}_fixed_100us", max(3.0, step_s))
        rates = [round(peak * f, -1) for f in STEP_FRACTIONS]
        cool_down(system, bodies, f"{LARGE_MODEL}_fixed_100us")
    log(f"adaptive batching ({LARGE_MODEL}): steps {rates} req/s, {repeats} x {step_s:.0f} s per policy and step, "
        f"target p99 {target_ms} ms")
    for name in POLICIES:
        # Warm-up, not recorded: TorchScript's profiling executor specializes on the first batch
        # shapes it sees, and each policy's model is a separate copy.
        _one_run(system, bodies, name, rates[len(rates) // 2], 2.0, arrivals, seed=99)
        cool_down(system, bodies, name)
    live = list(POLICIES)
    runs: list[dict] = []
    steps: dict[str, list[dict]] = {name: [] for name in POLICIES}
    for rate in rates:
        mine: dict[str, list[dict]] = {name: [] for name in live}
        for k in range(repeats):
            for name in live:
                record = _one_run(system, bodies, name, rate, step_s, arrivals, seed=k)
                mine[name].append(record)
                runs.append(record)
                if record["throughput_rps"] < 0.8 * rate:
                    cool_down(system, bodies, name)
        for name in list(live):
            s = _summary(name, rate, mine[name])
            steps[name].append(s)
            lat = s["latency_ms"]
            log(f"  {name:26s} {rate:7.0f}/s: {s['throughput_rps']:8.0f} req/s  p50 {lat['p50']} ms  "
                f"p99 {lat['p99']} ms {s['p99_ms_runs']}  cpu {s['cpu_busy']}  "
                f"{s['cpu_ms_per_request']} ms CPU/request  batch {s['avg_batch_rows']}")
            if s["throughput_rps"] is None or s["throughput_rps"] < 0.8 * rate:
                log(f"  {name}: overloaded at {rate:.0f}/s, no higher steps")
                live.remove(name)
        if not live:
            break
    for name in POLICIES:
        cool_down(system, bodies, name)
    return {"model": LARGE_MODEL, "target_ms": target_ms, "rates_rps": rates, "peak_rps": peak,
            "repeats": repeats, "step_s": step_s,
            "policies": {name: {"max_queue_delay_us": d, "latency_target_ms": target_ms if a else None}
                         for name, (d, a) in POLICIES.items()},
            "series": steps, "runs": runs, "goal": adaptive_goal(steps, target_ms)}


def adaptive_goal(series: dict[str, list[dict]], target_ms: float) -> dict:
    """Does adaptive keep p99 under the target where each fixed delay misses it or wastes throughput?

    Met when (1) adaptive meets the target at one step at least; (2) at every step where it
    does, each fixed policy either misses the target (or could not keep up) or spends at
    least CPU_WASTE x adaptive's CPU per request; and (3) no fixed policy meets the target
    at a higher rate than adaptive does.
    """
    adaptive = next((n for n in series if n.endswith("_adaptive")), None)
    fixed = [n for n in series if n != adaptive]

    def meets(step: dict | None) -> bool:
        p99 = None if step is None else step["latency_ms"]["p99"]
        ok = step is not None and step["throughput_rps"] is not None and step["throughput_rps"] >= 0.95 * step["rate_rps"]
        return ok and p99 is not None and p99 <= target_ms

    by_rate = {n: {s["rate_rps"]: s for s in steps} for n, steps in series.items()}
    verdicts = []
    for step in series.get(adaptive, []):
        if not meets(step):
            continue
        rate = step["rate_rps"]
        for name in fixed:
            other = by_rate[name].get(rate)
            if not meets(other):
                why = "misses the target" if other is not None else "could not keep up"
                verdicts.append({"rate_rps": rate, "policy": name, "verdict": why, "ok": True})
                continue
            ratio = (other["cpu_ms_per_request"] / step["cpu_ms_per_request"]
                     if other["cpu_ms_per_request"] and step["cpu_ms_per_request"] else None)
            wastes = ratio is not None and ratio >= CPU_WASTE
            verdicts.append({"rate_rps": rate, "policy": name, "cpu_ratio": None if ratio is None else round(ratio, 3),
                             "verdict": "wastes throughput" if wastes else "as good", "ok": wastes})
    best = {n: max((s["rate_rps"] for s in steps if meets(s)), default=None) for n, steps in series.items()}
    higher = [n for n in fixed if best[n] is not None and (best[adaptive] is None or best[n] > best[adaptive])]
    met = bool(verdicts) and all(v["ok"] for v in verdicts) and not higher
    return {"met": met if adaptive else None, "target_ms": target_ms, "highest_rate_under_target": best,
            "fixed_higher_than_adaptive": higher, "steps": verdicts}
