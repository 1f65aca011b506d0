"""The canary judge replayed on simulated traffic: false rollbacks, power and detection delay.

    python -m benchmarks.judge_trials [--quick] [--trials N] [--workers N] [--seed N]

No cluster: `serving.rollout.judge.Judge` alone, fed per-tick evidence as the controller would
hand it over. The world: 200 requests/s (Poisson per 1 s tick), each routed to the candidate with
probability 0.05 (the judge sees the realised counts); stable fails 0.1 % of requests; successful
requests' latency is lognormal (median 4 ms, sigma 0.5) binned over `LATENCY_EDGES_S`; outputs
are fraud-like probabilities (Beta(0.5, 8)) in 20 bins; every canary request is scored by stable
too (shadow) and labelled 30 s later: stable right 90 % of the time, the two versions disagreeing
on 6 % of the pairs. Each scenario changes the candidate only:

- `aa`: nothing (A/A): every rollback is false; run to the longest horizon (2,030 ticks);
- `crash`: every candidate request fails; `errors_5pct`: 5 % fail;
- `latency_1.5x`: every successful request 1.5x slower (median 6 ms);
- `latency_tail`: 4.04 % of requests drawn from stable's p99 .. 3x p99 (log-uniform), so the share
  above stable's p99 goes from 1 % to 5 %;
- `outputs_10pct`: 10 % of outputs replaced by a uniform random probability;
- `accuracy_3pts`: candidate right 87 % (b = only stable right 4.5 %, c = only candidate right
  1.5 %: 6 % discordant); `accuracy_3pts_4pct` (sensitivity, no goal): the same drop with 4 %
  discordant (b 3.5 %, c 0.5 %). Beside the judge, an oracle sign test that knows the true b/c
  (Wald's SPRT at that one ratio and the accuracy gate's alpha, which needs the fewest pairs on
  average of any test with these error rates) runs on the same pairs;
- `aa_loose`: A/A with false_rollback_rate 0.2 over 600 ticks: the rate the judge actually
  reaches against its setting (at 0.001 a few hundred A/A trials can only show zero).

A trial runs until the judge's first rollback or its horizon (10x the goal, in canary requests, or
labelled pairs for accuracy). On "pass" the benchmark calls `new_stage()` and keeps the share at
5 % (a controller would move to 20 %): the count of stages passed before a rollback says how often
a bad candidate would have been promoted a step first. Per-tick judge CPU is the thread's CPU time
around `Judge.update`. Trials run in `--workers` processes, each seeded by (seed, scenario, trial).
Writes benchmarks/results/judge_trials.json (git SHA, machine, settings, every trial's outcome),
benchmarks/results/judge_trials.md (the tables) and judge_trials.png (delay ECDFs against the
goals). The full run takes 4-7 minutes on 2 cores (most of it the A/A trials' 600,000 ticks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from benchmarks.judge_report import markdown, plot_delays, summarise
from serving.rollout.judge import LATENCY_EDGES_S, Judge, JudgeSettings
from serving.rollout.sequential import AllocationTest

__all__ = ["main", "run", "SCENARIOS", "Scenario", "World", "trial"]

RESULTS = Path("benchmarks/results")
RATE_PER_S = 200.0
SHARE = 0.05
LABEL_DELAY_TICKS = 30
STABLE_ERROR_RATE = 0.001
LATENCY_MEDIAN_S, LATENCY_SIGMA = 0.004, 0.5
SCORE_BETA = (0.5, 8.0)
SCORE_BINS = 20
STABLE_ACCURACY = 0.9
AA_DISCORDANT = 0.06


@dataclass(frozen=True)
class Scenario:
    """A candidate's regression, its goal (delay at the 95th percentile, in `unit`) and power goal."""

    name: str
    title: str
    goal: int | None = None  # None: no goal (A/A, sensitivity rows)
    unit: str = "canary requests"  # or "labelled pairs"
    power_goal: float | None = None
    error_rate: float = STABLE_ERROR_RATE
    latency: str = "stable"  # "stable", "slow", "tail"
    outputs_changed: float = 0.0
    only_stable_right: float = AA_DISCORDANT / 2  # b: stable right, candidate wrong (share of pairs)
    only_candidate_right: float = AA_DISCORDANT / 2  # c
    horizon: int = 0  # ticks; 0: from the goal
    false_rollback_rate: float | None = None  # a looser setting than the default, for calibration


SCENARIOS = (
    Scenario("aa", "A/A (candidate = stable)"),
    Scenario("crash", "crashes or fails every request", 20, power_goal=1.0, error_rate=1.0),
    Scenario("errors_5pct", "fails 5 % of requests (stable 0.1 %)", 300, power_goal=0.99, error_rate=0.05),
    Scenario("latency_1.5x", "latency x 1.5", 500, power_goal=0.99, latency="slow"),
    Scenario("latency_tail", "share of requests above stable's p99 from 1 % to 5 %", 2_000, power_goal=0.99,
             latency="tail"),
    Scenario("outputs_10pct", "10 % of outputs changed", 1_500, power_goal=0.99, outputs_changed=0.1),
    Scenario("accuracy_3pts", "accuracy -3 points, labels 30 s late (6 % discordant)", 2_000, "labelled pairs",
             0.99, only_stable_right=0.045, only_candidate_right=0.015),
    Scenario("accuracy_3pts_4pct", "accuracy -3 points, 4 % discordant (sensitivity)", None, "labelled pairs",
             only_stable_right=0.035, only_candidate_right=0.005, horizon=2_000 + LABEL_DELAY_TICKS),
    Scenario("aa_loose", "A/A at false_rollback_rate 0.2 (calibration)", horizon=600, false_rollback_rate=0.2),
)


def _horizon(s: Scenario) -> int:
    """Ticks a trial may run: 10x the goal in canary requests (pairs arrive 30 ticks late), or the longest."""
    if s.horizon:
        return s.horizon
    if s.goal is None:
        return max(_horizon(x) for x in SCENARIOS if x.goal is not None)  # A/A: the longest
    ticks = math.ceil(10 * s.goal / (RATE_PER_S * SHARE))
    return ticks + (LABEL_DELAY_TICKS if s.unit == "labelled pairs" else 0)


def _bucket_probs(cdf) -> np.ndarray:
    """Probabilities of the len(edges) + 1 latency buckets from a CDF over seconds."""
    inner = cdf(np.asarray(LATENCY_EDGES_S))
    return np.diff(np.concatenate([[0.0], inner, [1.0]]))


@dataclass
class World:
    """The traffic's distributions, computed once: latency buckets and score bins per variant."""

    latency: dict = field(default_factory=dict)
    scores: np.ndarray | None = None

    @classmethod
    def build(cls) -> World:
        def lognormal(median):
            return lambda x: norm.cdf((np.log(x) - math.log(median)) / LATENCY_SIGMA)

        stable = lognormal(LATENCY_MEDIAN_S)
        p99 = LATENCY_MEDIAN_S * math.exp(LATENCY_SIGMA * norm.ppf(0.99))
        rho = 0.04 / 0.99  # (1 - rho) * 1 % + rho = 5 % above stable's p99
        tail = lambda x: np.clip(np.log(np.asarray(x) / p99) / math.log(3.0), 0.0, 1.0)  # noqa: E731
        latency = {"stable": _bucket_probs(stable), "slow": _bucket_probs(lognormal(1.5 * LATENCY_MEDIAN_S)),
                   "tail": (1 - rho) * _bucket_probs(stable) + rho * _bucket_probs(tail)}
        scores = np.diff(beta_dist.cdf(np.linspace(0, 1, SCORE_BINS + 1), *SCORE_BETA))
        return cls(latency, scores / scores.sum())


def _ticks(world: World, s: Scenario, rng: np.random.Generator, ticks: int) -> dict:
    """A trial's whole traffic, drawn at once (arrays over ticks)."""
    n = rng.poisson(RATE_PER_S, ticks)
    nc = rng.binomial(n, SHARE)
    ns = n - nc
    es, ec = rng.binomial(ns, STABLE_ERROR_RATE), rng.binomial(nc, s.error_rate)
    ss, sc = ns - es, nc - ec
    out_c = (1 - s.outputs_changed) * world.scores + s.outputs_changed / SCORE_BINS
    # shadow pairs on the canary's answered requests, labelled LABEL_DELAY_TICKS later:
    # [only stable right, only candidate right, both wrong, both right]
    both_wrong = (1 - STABLE_ACCURACY) - s.only_candidate_right
    cells = [s.only_stable_right, s.only_candidate_right, both_wrong,
             1 - s.only_stable_right - s.only_candidate_right - both_wrong]
    labelled_c = np.concatenate([np.zeros(LABEL_DELAY_TICKS, np.int64), sc])[:ticks]
    labelled_s = np.concatenate([np.zeros(LABEL_DELAY_TICKS, np.int64), ss])[:ticks]
    pairs = rng.multinomial(labelled_c, cells)
    return {"requests": (ns, nc), "errors": (es, ec),
            "latency": (rng.multinomial(ss, world.latency["stable"]), rng.multinomial(sc, world.latency[s.latency])),
            "scores": (rng.multinomial(ss, world.scores), rng.multinomial(sc, out_c)),
            "labelled": (labelled_s, labelled_c),
            "wrong": (rng.binomial(labelled_s, 1 - STABLE_ACCURACY), pairs[:, 0] + pairs[:, 2]), "pairs": pairs}


def trial(args: tuple) -> dict:
    """One seeded trial of a scenario: the judge until its first rollback or the horizon."""
    world, s, settings, seed, index = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, SCENARIOS.index(s), index]))
    horizon = _horizon(s)
    data = _ticks(world, s, rng, horizon)
    if s.false_rollback_rate is not None:
        settings = replace(settings, false_rollback_rate=s.false_rollback_rate)
    judge = Judge(settings, n_score_bins=SCORE_BINS)
    oracle = None
    if s.unit == "labelled pairs":
        oracle = AllocationTest(settings.gate_alphas["accuracy"], "greater", [s.only_stable_right / s.only_candidate_right])
    oracle_pairs = None
    keys = ("requests", "errors", "latency", "scores", "labelled", "wrong")
    cpu_ns = np.zeros(horizon, np.int64)
    canary = pairs_seen = passes = 0
    outcome = {"rolled_back": False, "tick": None, "canary_requests": None, "labelled_pairs": None, "gates": []}
    for t in range(horizon):
        stable = {k: data[k][0][t] for k in keys}
        candidate = {k: data[k][1][t] for k in keys}
        row = data["pairs"][t]
        paired = {"pairs": int(row.sum()), "stable_only_right": int(row[0]), "candidate_only_right": int(row[1])}
        t0 = time.thread_time_ns()
        verdict = judge.update(stable, candidate, paired)
        cpu_ns[t] = time.thread_time_ns() - t0
        canary += int(data["requests"][1][t])
        pairs_seen += paired["pairs"]
        if oracle is not None and oracle_pairs is None and oracle.update(row[0], row[1], 0.5):
            oracle_pairs = pairs_seen
        if verdict.decision == "rollback":
            outcome.update(rolled_back=True, tick=t + 1, canary_requests=canary, labelled_pairs=pairs_seen,
                           gates=[g for g, e in verdict.gates.items() if e["state"] == "reject"])
            break
        if verdict.decision == "pass":
            passes += 1
            judge.new_stage()
    ran = outcome["tick"] or horizon
    if oracle is not None:
        later = pairs_seen
        for row in data["pairs"][ran:]:  # the oracle's own delay, past the judge's rollback if need be
            if oracle_pairs is not None:
                break
            later += int(row.sum())
            if oracle.update(row[0], row[1], 0.5):
                oracle_pairs = later
        outcome["oracle_pairs"] = oracle_pairs
    return {**outcome, "scenario": s.name, "trial": index, "ticks": ran, "stages_passed": passes,
            "canary_total": canary, "pairs_total": pairs_seen, "cpu_ns": cpu_ns[:ran]}


PLANS = {"full": {"trials": 300}, "quick": {"trials": 30}}


def run(trials: int, workers: int, seed: int, out: Path, quick: bool = False) -> dict:
    """All scenarios, `trials` each: the report dict (also written as JSON and markdown under `out`)."""
    from benchmarks.report import git_sha, machine

    settings = JudgeSettings(labels_expected=True)
    world = World.build()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    jobs = [(world, s, settings, seed, i) for s in SCENARIOS for i in range(trials)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(trial, jobs, chunksize=4)
    cpu = np.concatenate([r.pop("cpu_ns") for r in results]) / 1e3
    report = {
        "benchmark": "judge_trials", "started": started.isoformat(), "git_sha": git_sha(), "machine": machine(),
        "quick": quick, "seed": seed, "trials_per_scenario": trials, "workers": workers,
        "settings": settings.to_dict(), "active_gates": list(settings.active_gates),
        "gate_alphas": settings.gate_alphas,
        "world": {"rate_per_s": RATE_PER_S, "tick_s": 1.0, "share": SHARE, "label_delay_s": LABEL_DELAY_TICKS,
                  "stable_error_rate": STABLE_ERROR_RATE, "latency_median_s": LATENCY_MEDIAN_S,
                  "latency_sigma": LATENCY_SIGMA, "score_beta": SCORE_BETA, "score_bins": SCORE_BINS,
                  "stable_accuracy": STABLE_ACCURACY, "aa_discordant": AA_DISCORDANT},
        "scenarios": [{**asdict(s), "horizon_ticks": _horizon(s)} for s in SCENARIOS],
        "summary": summarise(SCENARIOS, results),
        "cpu_us_per_tick": {"ticks": int(cpu.size), "mean": float(cpu.mean()), "p50": float(np.percentile(cpu, 50)),
                            "p99": float(np.percentile(cpu, 99)), "max": float(cpu.max())},
        "trials": results, "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge_trials.json").write_text(json.dumps(report, indent=1, allow_nan=False, default=_jsonable))
    (out / "judge_trials.md").write_text(markdown(report))
    plot_delays(report, out / "judge_trials.png")
    return report


def _jsonable(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.judge_trials", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 trials per scenario: a smoke run under a minute")
    parser.add_argument("--trials", type=int, default=None, help="trials per scenario (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every trial")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    trials = args.trials or PLANS["quick" if args.quick else "full"]["trials"]
    report = run(trials, args.workers, args.seed, args.out, quick=args.quick)
    print(markdown(report))
    print(f"\n{args.out / 'judge_trials.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
