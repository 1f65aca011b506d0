"""`python -m benchmarks` (`make bench`): fleet against its baselines, in one run, on one machine.

    python -m benchmarks                      # everything (about 10 minutes on 2 cores)
    python -m benchmarks --quick              # shorter runs, fewer points
    python -m benchmarks --url http://127.0.0.1:8000 --systems fleet   # a fleet already running
    python -m benchmarks --systems fleet,triton --connections 1,16,64
    python -m benchmarks --systems '' --lifecycle --logging-cost   # only the monitoring scenarios

Every system serves the same TorchScript file (the `fraud` model, trained into a
fresh repository) and gets the same request bodies. Results go to
`benchmarks/results/<timestamp>/`: report.json, summary.md and PNG plots. `--lifecycle` and
`--logging-cost` add the monitoring scenarios (`benchmarks.lifecycle`, `benchmarks.logging_cost`,
each on a cluster of its own after the systems above), written to `lifecycle/` and `logging_cost/`
inside the run's folder, with their goals in its report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.adaptive import adaptive_scenario, publish_policies, publish_variants
from benchmarks.bodies import request_bodies
from benchmarks.report import git_sha, machine, ratios_and_goals, write_report
from benchmarks.scenarios import Bodies, binary_vs_json, closed_sweep, cool_down, mixed_models, open_rate, step_rates
from benchmarks.soak import SCENARIOS as SOAK_SCENARIOS
from benchmarks.soak import publish_soak_models, run_soak, soak_goals
from benchmarks.systems import BaselineSystem, FleetSystem, System, TritonSystem
from benchmarks.wrk import wrk_available
from serving.registry import ModelRepository

MODEL = "fraud"
# The mixed scenario: (model, body kind) -> share of the requests, at half fleet's sustained rate.
MIX = {("fraud", "json"): 0.5, ("fraud", "binary"): 0.2, ("fraud_adaptive", "json"): 0.2,
       ("fraud_fixed_8ms", "binary"): 0.1}
RAMP = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # fractions of fleet's closed-loop peak, to find its sustained rate
SYSTEMS = ("fleet", "fleet_split", "fleet_serve", "plain_http", "serve_default", "triton")
ADAPTIVE_TARGET_MS = 25.0
# Copies of `fraud` for the mixed-model scenario: name -> (max_queue_delay_us, adaptive: latency_target_ms set)
VARIANTS = {
    "fraud_fixed_8ms": (8000, False),
    "fraud_adaptive": (1000, True),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="measure a fleet already running here instead of starting one")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--connections", default="1,4,16,64,256", help="closed-loop sweep (wrk connections)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per closed-loop point")
    p.add_argument("--open-duration", type=float, default=10.0, help="seconds of the open-loop comparison")
    p.add_argument("--step-seconds", type=float, default=5.0, help="seconds per run of the adaptive scenario")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per policy and step (adaptive scenario)")
    p.add_argument("--adaptive-rates", help="comma-separated req/s steps of the adaptive scenario "
                   "(default: fractions of the model's closed-loop peak)")
    p.add_argument("--arrivals", choices=["poisson", "constant"], default="poisson", help="open-loop arrivals")
    p.add_argument("--quick", action="store_true", help="2 s points, connections 1,16,64, shorter scenarios")
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive batching scenario")
    p.add_argument("--latency-target-ms", type=float, default=ADAPTIVE_TARGET_MS,
                   help="the adaptive model's p99 target (latency_target_ms)")
    p.add_argument("--only-adaptive", action="store_true",
                   help="fleet only: the adaptive batching scenario and nothing else")
    p.add_argument("--soak-minutes", type=float, default=0.0,
                   help="also run the fault soak scenarios (benchmarks.soak: overload, replica_kill) this long each")
    p.add_argument("--lifecycle", action="store_true",
                   help="also run the monitoring lifecycle scenario (benchmarks.lifecycle; --quick: its short plan)")
    p.add_argument("--logging-cost", action="store_true",
                   help="also measure the prediction log's cost (benchmarks.logging_cost: peak of a logged model against "
                        "an unlogged copy, alternating by 2 s phases on the same connections, then --logging-minutes at "
                        "80 %% of the logged peak)")
    p.add_argument("--logging-minutes", type=float, default=None,
                   help="the logging cost's sustained run (default 10; --quick 1)")
    p.add_argument("--binary-seconds", type=float, default=60.0,
                   help="fleet's binary against JSON bodies taking turns by 2 s phases on the same 64 connections, "
                        "this long (--quick 24; 0 skips it)")
    p.add_argument("--triton-instances", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results", help="parent folder of the run's folder")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.open_duration, args.step_seconds, args.repeats = 3.0, 5.0, 3.0, 2
        if args.binary_seconds == p.get_default("binary_seconds"):
            args.binary_seconds = 24.0
        if args.connections == p.get_default("connections"):
            args.connections = "1,16,64"
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.only_adaptive:
        args.systems = ["fleet"]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.connections = sorted({int(c) for c in args.connections.split(",")})
    args.adaptive_rates = [float(r) for r in args.adaptive_rates.split(",")] if args.adaptive_rates else None
    return args


def build_repository(folder: Path, target_ms: float = ADAPTIVE_TARGET_MS) -> ModelRepository:
    """A fresh repository: the fraud model, copies of it under other batching policies, and fraud_large's policies."""
    from training.bootstrap import bootstrap

    bootstrap(str(folder), rows=20_000, epochs=3, log=lambda line: None)
    repo = ModelRepository(str(folder))
    publish_variants(repo, MODEL, repo, VARIANTS, target_ms, note=f"{MODEL}/1")
    publish_policies(repo, target_ms)
    publish_soak_models(repo)
    return repo


def write_bodies(repo: ModelRepository, folder: Path) -> Bodies:
    folder.mkdir(parents=True, exist_ok=True)
    made = request_bodies(repo.root, MODEL, rows=1)
    for kind, (body, _) in made.items():
        (folder / f"{MODEL}-{kind}.body").write_bytes(body)
    return Bodies(folder, MODEL, made["json"][0], made["binary"][0], made["binary"][1])


def only_model(repo: ModelRepository, folder: Path) -> str:
    """A repository holding a copy of `MODEL` alone. Split mode deploys a worker per model: with the scenarios'
    other models (8 in all) its 9 workers and 2 ingress replicas ask Ray for more than this machine's 2 CPUs,
    and `fleet up` waits for them to be scheduled until it times out."""
    shutil.copytree(Path(repo.root) / MODEL, folder / MODEL)
    return str(folder)


def make_systems(args, repo: ModelRepository) -> list[System]:
    from benchmarks.baselines import PlainHttpServer, ServeDefaultServer

    spec = repo.spec(MODEL)
    out: list[System] = []
    for name in args.systems:
        if name == "fleet":
            out.append(FleetSystem(repo.root, url=args.url, label="fleet (defaults)"))
        elif name == "fleet_split" and not args.url:
            split_repo = only_model(repo, Path(repo.root).parent / "repository-split")
            out.append(FleetSystem(split_repo, name=name, flags=("--placement", "split"),
                                   label="fleet, split mode (ingress -> worker deployment, one Ray call per batch)"))
        elif name == "fleet_serve" and not args.url:
            out.append(FleetSystem(repo.root, name=name, flags=("--http-server", "serve"),
                                   label="fleet behind Ray Serve's HAProxy ingress"))
        elif name == "plain_http":
            out.append(BaselineSystem(name, "uvicorn + Starlette, 1 process, no batching",
                                      lambda: PlainHttpServer(repo.root, MODEL)))
        elif name == "serve_default":
            out.append(BaselineSystem(name, "default Ray Serve deployment (Python proxy, per request)",
                                      lambda: ServeDefaultServer(repo.root, MODEL)))
        elif name == "triton":
            out.append(TritonSystem(
                repo.model_file(MODEL, 1), MODEL, [(t.name, t.datatype, t.dims) for t in spec.inputs],
                [(t.name, t.datatype, t.dims) for t in spec.outputs], max_batch_size=spec.max_batch_size,
                max_queue_delay_us=spec.batching.max_queue_delay_us, instances=args.triton_instances))
    return out


def run(args) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) / stamp
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    print(f"benchmark run {stamp}: results in {out_dir}", flush=True)
    repo = build_repository(work / "repository", args.latency_target_ms)
    bodies = write_bodies(repo, work / "bodies")
    from benchmarks.baselines import measure_inprocess

    print("in-process model (the limit for compute) ...", flush=True)
    inprocess = measure_inprocess(repo.root, MODEL)
    closed, opened, adaptive, systems, ramp, mixed, soak = [], [], {}, [], [], {}, {}
    binary_json = None
    sustained = peak = None
    for system in make_systems(args, repo):
        print(f"{system.name}: starting ({system.label}) ...", flush=True)
        started = time.monotonic()
        with system:
            systems.append({**system.describe(), "start_s": round(time.monotonic() - started, 1)})
            main = system.name in ("fleet", "triton")
            connections = args.connections if main else sorted({1, 4, 64, max(args.connections)} & set(args.connections))
            kinds = ("json", "binary") if main else ("json",)
            if args.only_adaptive:
                adaptive = adaptive_scenario(system, bodies, args.step_seconds, args.repeats,
                                             args.latency_target_ms, args.arrivals, args.adaptive_rates)
                continue
            closed += closed_sweep(system, bodies, connections, args.duration, kinds)
            if system.name == "fleet" and args.binary_seconds > 0:
                binary_json = binary_vs_json(system, bodies, args.binary_seconds, connections=max(args.connections))
            if system.name == "fleet":
                peak = max((r["throughput_rps"] for r in closed if r["system"] == "fleet"), default=0)
                if peak:
                    ramp = step_rates(system, bodies, MODEL, [round(peak * f, -1) for f in RAMP], args.step_seconds,
                                      args.arrivals)
                    sustained = sustained_rate(ramp)
            if system.name in ("fleet", "triton") and sustained:
                opened.append(open_rate(system, bodies, sustained, args.open_duration, arrivals=args.arrivals))
                cool_down(system, bodies, MODEL)
            if system.name == "fleet" and not args.url:
                if sustained:
                    mixed = mixed_models(system, bodies, MIX, 0.5 * sustained, args.open_duration, args.arrivals)
                    cool_down(system, bodies, MODEL)
                if not args.no_adaptive:
                    adaptive = adaptive_scenario(system, bodies, args.step_seconds, args.repeats,
                                                 args.latency_target_ms, args.arrivals, args.adaptive_rates)
                if args.soak_minutes > 0:
                    soak = run_soak(system, list(SOAK_SCENARIOS), args.soak_minutes, 300.0, 30.0, repo)
    ratios, goals = ratios_and_goals(closed, opened, peak_connections=64 if 64 in args.connections
                                     else max(args.connections), inprocess=inprocess, binary_json=binary_json)
    if adaptive:
        verdict = adaptive["goal"]
        best = verdict["highest_rate_under_target"]
        goals.append({"goal": f"adaptive batching keeps p99 under {args.latency_target_ms:g} ms where a fixed delay "
                              "misses it or wastes throughput (highest step under target per policy)",
                      "value": ", ".join(f"{n}: {r if r is not None else '-'}" for n, r in best.items()),
                      "target": None, "unit": "", "met": verdict["met"], "gap": None})
    goals += soak_goals(soak)
    lifecycle, logging_cost = monitoring_scenarios(args, out_dir)
    goals += (lifecycle or {}).get("goals", []) + (logging_cost or {}).get("goals", [])
    report = {
        "git_sha": git_sha(), "machine": machine(), "model": MODEL,
        "config": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "systems": systems, "inprocess": inprocess, "closed_loop": closed, "open_loop": opened,
        "binary_vs_json": binary_json, "fleet_ramp": ramp, "sustained_rate_rps": sustained, "mixed_models": mixed, "adaptive": adaptive, "soak": soak,
        "lifecycle": lifecycle, "logging_cost": logging_cost, "ratios": ratios, "goals": goals,
    }
    for path in write_report(out_dir, report):
        print(f"wrote {path}")
    print((out_dir / "summary.md").read_text())
    return out_dir


def monitoring_scenarios(args, out_dir: Path) -> tuple[dict | None, dict | None]:
    """The lifecycle and logging-cost scenarios when asked for (each starts, and stops, a cluster of its own)."""
    lifecycle = logging_cost = None
    if args.lifecycle:
        from benchmarks.lifecycle import COMMON, PLANS, run_lifecycle

        print("monitoring lifecycle scenario ...", flush=True)
        mode = "quick" if args.quick else "full"
        lifecycle = run_lifecycle({**COMMON, **PLANS[mode], "mode": mode}, out_dir / "lifecycle")
    if args.logging_cost:
        from benchmarks.logging_cost import run_logging_cost
        from benchmarks.logging_report import cost_markdown

        print("prediction-log cost ...", flush=True)
        minutes = args.logging_minutes if args.logging_minutes is not None else (1.0 if args.quick else 10.0)
        cost_args = argparse.Namespace(clusters=1 if args.quick else 2, seconds=60.0 if args.quick else 300.0,
                                       phase=2.0, duration=5.0, rounds=0, repeats=3, connections=64,
                                       minutes=minutes, sustained_share=0.8, quick=args.quick)
        logging_cost = run_logging_cost(cost_args)
        folder = out_dir / "logging_cost"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(logging_cost, indent=2, default=str))
        (folder / "summary.md").write_text(cost_markdown(logging_cost))
    return lifecycle, logging_cost


def sustained_rate(ramp: list[dict]) -> float | None:
    """The highest offered rate fleet kept up with, every step below it too: >= 97 % delivered, every
    answer 2xx, p99 under 100 ms (a step that passes after one that failed is luck, not capacity)."""
    best = None
    for step in ramp:
        ok = sum(n for s, n in step["statuses"].items() if s.startswith("2"))
        p99 = step["latency_ms"]["p99"]
        if not (step["throughput_rps"] >= 0.97 * step["rate_rps"] and ok == step["requests"] and not step["errors"]
                and p99 is not None and p99 < 100):
            break
        best = step["rate_rps"]
    return best


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    # SIGTERM unwinds like Ctrl-C, so every system started so far is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not wrk_available():
        print("wrk is not installed: run `make wrk` (Debian's package)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
