"""The benchmark report's arithmetic: server statistics deltas, ratios, goals, sustained rate, files."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import sustained_rate
from benchmarks.report import ratios_and_goals, summary_markdown, write_report
from benchmarks.systems import stats_delta


def _entry(success, queue_ns, infer_ns, rows, executions, batches):
    return {
        "inference_count": rows, "execution_count": executions,
        "inference_stats": {"success": {"count": success, "ns": success * 2_000_000},
                            "queue": {"count": success, "ns": queue_ns},
                            "compute_infer": {"count": success, "ns": infer_ns}},
        "batch_stats": [{"batch_size": size, "compute_infer": {"count": n, "ns": 0}} for size, n in batches.items()],
    }


def test_stats_delta_is_what_the_server_did_between_two_documents():
    before = _entry(100, 50_000_000, 30_000_000, 100, 40, {1: 20, 4: 20})
    after = _entry(300, 250_000_000, 90_000_000, 300, 80, {1: 20, 4: 40, 8: 15})
    delta = stats_delta(before, after)
    assert delta["requests"] == 200 and delta["executions"] == 40
    assert delta["avg_batch_rows"] == 5.0
    assert delta["queue_ms"] == pytest.approx(1.0) and delta["compute_ms"] == pytest.approx(0.3)
    assert delta["batch_sizes"] == {4: 20, 8: 15}  # sizes that did not run in between are left out
    assert stats_delta(None, None) == {}


def _run(system, connections, rps, p50, p99, body="json"):
    return {"system": system, "body": body, "mode": "closed", "connections": connections, "throughput_rps": rps,
            "rate_rps": None, "requests": int(rps), "statuses": {"200": int(rps)}, "errors": {},
            "latency_ms": {"p50": p50, "p90": p99, "p95": p99, "p99": p99, "max": p99, "mean": p50},
            "server": {"avg_batch_rows": 3.0, "batch_sizes": {1: 5, 4: 2}}}


def _open(system, rate, p99):
    run = _run(system, None, rate, 1.0, p99)
    run.update(mode="open", rate_rps=rate)
    return run


def test_ratios_and_goals_say_met_or_missed_by_how_much():
    runs = [_run("fleet", 1, 1500, 0.8, 2.0), _run("fleet", 64, 6000, 9.0, 30.0),
            _run("fleet", 64, 6600, 8.0, 25.0, body="binary"),
            _run("triton", 1, 300, 3.3, 5.0), _run("triton", 64, 5000, 12.0, 40.0),
            _run("serve_default", 1, 180, 5.4, 9.0), _run("serve_default", 64, 530, 100.0, 300.0)]
    ratios, goals = ratios_and_goals(runs, [_open("fleet", 5000, 20.0), _open("triton", 5000, 900.0)])
    assert ratios["triton"]["throughput_c64"] == pytest.approx(1.2)
    assert ratios["serve_default"]["throughput_c64"] == pytest.approx(11.321, abs=1e-3)
    by_name = {g["goal"]: g for g in goals}
    triton = by_name["throughput at 64 connections vs Triton"]
    assert triton["met"] is False and triton["gap"] == pytest.approx(-0.05)
    assert by_name["throughput at 64 connections vs default Ray Serve"]["met"] is True
    assert by_name["p50 latency at 1 connection"]["met"] is True
    assert by_name["binary vs JSON throughput at 64 connections"]["value"] == pytest.approx(1.1)
    p99 = next(g for g in goals if g["goal"].startswith("p99 at fleet's sustained rate"))
    assert p99["met"] is True and "5000/s" in p99["goal"]


def test_the_binary_goal_is_decided_by_the_turns_when_there_are_some_and_met_only_above_1_throughout():
    runs = [_run("fleet", 64, 6000, 9.0, 30.0), _run("fleet", 64, 5000, 8.0, 25.0, body="binary")]  # 0.83 apart
    turns = {"mean": 1.011, "ci95": [0.954, 1.077], "n": 21, "connections": 64, "phase_s": 2.0}

    def binary_goal(**changes):
        _, goals = ratios_and_goals(runs, [], binary_json={**turns, **changes})
        return next(g for g in goals if g["goal"].startswith("binary vs JSON"))

    at_parity = binary_goal()
    assert at_parity["value"] == 1.011 and at_parity["met"] is False and "21 pairs" in at_parity["goal"]
    assert "0.954-1.077" in at_parity["goal"]
    assert binary_goal(mean=1.05, ci95=[1.01, 1.09])["met"] is True


def test_goals_without_a_baseline_are_not_available_rather_than_met():
    _, goals = ratios_and_goals([_run("fleet", 64, 6000, 9.0, 30.0)], [])
    assert {g["goal"]: g["met"] for g in goals}["throughput at 64 connections vs Triton"] is None


def test_sustained_rate_is_the_highest_step_fleet_kept_up_with():
    def step(rate, achieved, p99, statuses=None, errors=None):
        return {"rate_rps": rate, "throughput_rps": achieved, "requests": int(achieved),
                "statuses": statuses or {"200": int(achieved)}, "errors": errors or {},
                "latency_ms": {"p99": p99}}

    ramp = [step(1000, 1000, 5.0), step(2000, 1990, 8.0), step(3000, 2990, 400.0), step(4000, 2500, 900.0)]
    assert sustained_rate(ramp) == 2000
    assert sustained_rate([step(1000, 1000, 5.0, statuses={"200": 990, "503": 10})]) is None
    assert sustained_rate([]) is None
    # a step that passes after one that failed does not count: the ramp stops at the first failure
    assert sustained_rate([step(1000, 1000, 5.0), step(2000, 1990, 150.0), step(3000, 2990, 9.0)]) == 1000


def test_report_files_are_written_with_tables_and_plots(tmp_path):
    runs = [_run("fleet", 1, 1500, 0.8, 2.0), _run("fleet", 64, 6000, 9.0, 30.0), _run("triton", 64, 5000, 12, 40)]
    ratios, goals = ratios_and_goals(runs, [])
    steps = [dict(_open("fraud_adaptive", r, 5.0), model="fraud_adaptive") for r in (100, 200)]
    report = {"closed_loop": runs, "open_loop": [], "ratios": ratios, "goals": goals,
              "adaptive": {"target_ms": 10.0, "series": {"fraud_adaptive": steps}}}
    paths = write_report(tmp_path, report)
    names = {p.name for p in paths}
    assert {"report.json", "summary.md", "latency_vs_throughput.png", "batch_sizes.png",
            "adaptive_batching.png"} <= names
    assert json.loads((tmp_path / "report.json").read_text())["goals"] == goals
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = summary_markdown(report)
    assert "| fleet | 64 | json | 6000 | 9.00 | 30.00 |" in table
    assert "| fraud_adaptive | 200 |" in table
