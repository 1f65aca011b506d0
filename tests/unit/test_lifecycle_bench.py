"""The lifecycle and logging-cost benchmarks' arithmetic (benchmarks/lifecycle_report.py, logging_report.py),
from made-up records: no cluster, no timing."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from benchmarks.lifecycle_report import auc_checks, detector_delays, lifecycle_goals, lifecycle_markdown, rows_at, \
    stable_false_alarms, window_auc
from benchmarks.lifecycle_traffic import compact_drift, compact_quality
from benchmarks.live_cluster import ClusterCpu, CpuReading, metric_sum, metric_values
from benchmarks.logging_report import cost_goals, cost_markdown, cpu_share, log_cpu_summary, pair_ratios, \
    paired_ratios
from benchmarks.wrk import WrkError, parse_phases, phase_pairs

SEND = np.arange(1000) / 100.0  # 100 requests/s for 10 s


def _alarm(since_t: float, stream: str, alarm: str = "drift", version: int = 1, detector: str = "cusum") -> dict:
    return {"event": "alarm", "alarm": alarm, "version": version, "stream": stream, "detector": detector,
            "statistic": "ridit_up", "since_t": since_t, "rows": 123}


def test_rows_at_counts_the_rows_of_the_requests_scheduled_before_a_moment():
    assert rows_at(SEND, 10, 0.0) == 0
    assert rows_at(SEND, 10, 0.005) == 10  # request 0 is due at 0
    assert rows_at(SEND, 10, 2.0) == 2000  # requests 0..199
    assert rows_at(SEND, 10, 99.0) == 10_000


def test_delays_are_the_first_alarm_of_each_stream_between_an_onset_and_the_next():
    onsets = [{"name": "covariate_shift", "t": 3.0, "row": 3000}, {"name": "concept_shift", "t": 6.0, "row": 6000}]
    events = [
        _alarm(1.0, "amount"),  # before the first onset: a false alarm, in no onset's delays
        {"event": "alarm_cleared", "alarm": "drift", "version": 1, "stream": "amount", "since_t": 2.0},
        _alarm(3.5, "amount", detector="rows_window"),
        _alarm(3.2, "score"),
        _alarm(3.9, "score"),  # a second alarm of the same stream: not its first
        _alarm(4.0, "pca"),
        _alarm(6.25, "label_error", alarm="quality", detector="bernoulli_cusum"),
        _alarm(7.0, "amount", version=2, detector="time_window"),
    ]
    delays = detector_delays(events, onsets, SEND, 10)
    cov, concept = delays
    assert [a["stream"] for a in cov["alarms"]] == ["score", "amount", "pca"]
    assert cov["summary"]["first_drift"] == {"version": 1, "stream": "score", "detector": "cusum",
                                             "delay_rows": 200, "delay_s": 0.2}
    feature = cov["summary"]["first_feature"]
    assert feature["stream"] == "amount" and feature["delay_rows"] == 500
    assert cov["summary"]["rows_window"]["stream"] == "amount" and cov["summary"]["label_error"] is None
    assert cov["already_alarming"] == [] and cov["drift_streams_alarmed"] == 3
    assert concept["summary"]["label_error"]["delay_rows"] == 250  # 6.25 s: requests 0..624
    assert concept["summary"]["time_window"]["version"] == 2
    # Alarms still holding at the second onset (raised after the first, never cleared).
    assert concept["already_alarming"] == ["drift v1 amount", "drift v1 pca", "drift v1 score"]
    assert [e["stream"] for e in stable_false_alarms(events, 3.0)] == ["amount"]


def test_window_auc_takes_the_latest_rows_in_the_monitors_join_order():
    rng = np.random.default_rng(0)
    n = 3000
    received = np.repeat(np.arange(30), 100) * 1_000_000  # 30 feedback bodies of 100 labels
    predicted = received - 5_000_000 + rng.integers(0, 900_000, n)  # each 5 s before its label, shuffled
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * 0.3 + rng.random(n), 0, 1)
    shuffle = rng.permutation(n)  # the order on disk is no order
    doc = window_auc(received[shuffle], predicted[shuffle], labels[shuffle], scores[shuffle], 1000)
    assert doc["rows"] == 1000
    assert doc["roc_auc"] == pytest.approx(roc_auc_score(labels[-1000:], scores[-1000:]), abs=1e-12)
    assert window_auc(received, predicted, np.zeros(n, int), scores, 100)["roc_auc"] is None  # one class
    assert window_auc(received, predicted, labels, scores, 0)["rows"] == n  # 0: every row


def test_auc_checks_report_the_worst_difference_against_the_tolerance():
    checkpoints = [{"versions": {"1": {"diff": 0.0, "rows_online": 10, "rows_offline": 10}}},
                   {"versions": {"1": {"diff": 0.0004, "rows_online": 10, "rows_offline": 10},
                                 "2": {"diff": None, "rows_online": 0, "rows_offline": 0}}}]
    assert auc_checks(checkpoints) == {"comparisons": 2, "max_abs_diff": 0.0004, "same_row_counts": True,
                                       "met": True}
    checkpoints[0]["versions"]["1"]["diff"] = 0.002
    assert auc_checks(checkpoints)["met"] is False
    assert auc_checks([])["met"] is None


def _lifecycle_report() -> dict:
    onsets = [{"name": "covariate_shift", "t": 3.0, "row": 3000}, {"name": "concept_shift", "t": 6.0, "row": 6000}]
    events = [_alarm(3.2, "score"), _alarm(6.5, "label_error", alarm="quality", detector="bernoulli_cusum")]
    return {"plan": {"rate_rps": 100, "rows_per_request": 10, "label_delay_s": 5,
                     "phases": [{"scenario": "baseline", "seconds": 3}, {"scenario": "covariate_shift", "seconds": 3},
                                {"scenario": "concept_shift", "seconds": 3}], "retrain_after_s": 30},
            "stable_rows": 3000, "stable_false_alarms": [], "delays": detector_delays(events, onsets, SEND, 10),
            "auc": {"max_abs_diff": 0.0, "met": True}, "onsets": onsets,
            "auc_checkpoints": [{"name": "final", "t": 9.0, "versions": {"1": {"online": 0.9, "offline": 0.9,
                                                                              "rows_online": 5, "diff": 0.0}}}],
            "retrain": {"submitted": True, "submitted_t": 40.0, "status": "SUCCEEDED", "new_version": 2,
                        "gate": "accepted", "served_t": 120.0, "duration_s": 70.0, "job": "raysubmit_1"}}


def test_lifecycle_goals_count_false_alarms_detections_auc_and_the_retrain():
    report = _lifecycle_report()
    goals = {g["goal"].split(" (")[0]: g for g in lifecycle_goals(report)}
    assert goals["lifecycle: alarms during the stable phase"]["met"] is True
    assert goals["lifecycle: covariate shift raises a drift alarm"]["value"] == 200
    assert goals["lifecycle: concept shift raises the label-error alarm"]["value"] == 500
    assert goals["lifecycle: the retrained version served"]["met"] is True
    report["retrain"].update(status="FAILED", served_t=None)
    report["stable_false_alarms"] = [_alarm(1.0, "amount")]
    goals = {g["goal"].split(" (")[0]: g for g in lifecycle_goals(report)}
    assert goals["lifecycle: alarms during the stable phase"]["met"] is False
    assert goals["lifecycle: alarms during the stable phase"]["gap"] == 1
    assert goals["lifecycle: the retrain job's outcome"]["met"] is False
    report["goals"] = lifecycle_goals(report)
    text = lifecycle_markdown(report)
    assert "| covariate_shift | 3,000 | 200 rows / 0 s (score, cusum, v1)" in text and "raysubmit_1" in text


def test_a_label_error_alarm_from_before_the_concept_shift_counts_only_while_it_holds():
    onsets = [{"name": "covariate_shift", "t": 3.0, "row": 3000}, {"name": "concept_shift", "t": 6.0, "row": 6000}]
    raised = _alarm(4.0, "label_error", alarm="quality", detector="bernoulli_cusum")
    cleared = {"event": "alarm_cleared", "alarm": "quality", "version": 1, "stream": "label_error", "since_t": 7.0}
    name = "lifecycle: concept shift raises the label-error alarm (rows after the onset)"
    report = {**_lifecycle_report(), "delays": detector_delays([raised], onsets, SEND, 10)}
    held = next(g for g in lifecycle_goals(report) if g["goal"] == name)
    assert held["met"] is None and held["value"] == "held from before the onset"
    report["delays"] = detector_delays([raised, cleared], onsets, SEND, 10)  # it cleared: the shift went unseen
    missed = next(g for g in lifecycle_goals(report) if g["goal"] == name)
    assert missed["met"] is False and missed["value"] is None
    # Version 1's alarm holds for ever once version 2 answers (no labels of v1 come to clear it): not v2's.
    report.update(delays=detector_delays([raised], onsets, SEND, 10), versions_first_answered_t={"1": 0.0, "2": 5.0})
    assert next(g for g in lifecycle_goals(report) if g["goal"] == name)["met"] is False
    text = lifecycle_markdown({**report, "goals": lifecycle_goals(report)})
    assert "| concept_shift | 6,000 | - | - | - | - | - | 0 | quality v1: label_error |" in text


def _round(r: int, logging: bool, rps: list[float], shares: list[float | None]) -> dict:
    runs = [{"throughput_rps": x, "monitor_share": s, "monitor_process_share": s, "log_dropped": 0,
             "latency_ms": {"p50": 1.0, "p99": 5.0}} for x, s in zip(rps, shares)]
    return {"round": r, "name": f"r{r}-{'on' if logging else 'off'}", "logging": logging, "runs": runs,
            "median_rps": float(np.median(rps))}


def test_pair_ratios_divide_each_rounds_medians_and_show_their_spread():
    rounds = [_round(1, True, [970, 980, 990], [0.002] * 3), _round(1, False, [1000, 1000, 990], [0.001] * 3),
              _round(2, False, [1000, 1020, 1010], [0.001] * 3), _round(2, True, [950, 960, 1000], [0.004] * 3)]
    ratio = pair_ratios(rounds)
    assert ratio["per_round"] == [0.98, round(960 / 1010, 4)]
    assert ratio["median"] == pytest.approx((0.98 + 960 / 1010) / 2, abs=1e-4)
    assert ratio["min"] == round(960 / 1010, 4) and ratio["max"] == 0.98
    assert ratio["pooled"] == round(975 / 1000, 4)  # medians of every run: 975 and 1000
    assert ratio["cost"] == pytest.approx(1 - ratio["median"], abs=1e-9)
    assert ratio["on_spread"] == {"median": 975.0, "min": 950.0, "max": 1000.0, "range_pct": 5.1}


def test_paired_ratios_average_each_pairs_ratio_with_a_seeded_bootstrap_interval():
    rng = np.random.default_rng(7)
    off = rng.uniform(9_000, 14_000, 40)  # the spread between runs the ratio of a pair cancels
    on = off * rng.normal(0.97, 0.02, 40)
    paired = paired_ratios(list(zip(on, off)))
    ratios = on / off
    assert paired["n"] == 40 and paired["mean"] == pytest.approx(ratios.mean(), abs=1e-4)
    assert paired["cost"] == pytest.approx(1 - ratios.mean(), abs=1e-4)
    low, high = paired["ci95"]
    half = 1.96 * ratios.std(ddof=1) / np.sqrt(40)  # the bootstrap interval is about the normal one
    assert low == pytest.approx(ratios.mean() - half, abs=0.002) and high == pytest.approx(ratios.mean() + half, abs=0.002)
    assert paired["cost_ci95"] == [pytest.approx(1 - high, abs=1e-4), pytest.approx(1 - low, abs=1e-4)]
    assert paired_ratios(list(zip(on, off))) == paired  # seeded
    assert paired_ratios([(1.0, 0.0)])["mean"] is None  # no usable pair


def _alternating(name: str, pairs: list, writer: float, path: float, cpu: float) -> dict:
    return {"name": name, "phase_s": 2.0, "pairs": pairs, "non_2xx": 0, "log_cpu_s": {"writer": writer,
            "request_path": path}, "cluster_cpu_s": cpu, "logged_answers": sum(a for a, _ in pairs),
            "unlogged_answers": sum(b for _, b in pairs), "log_rows": sum(a for a, _ in pairs),
            "log_cpu_share": None, "monitor_share": 0.002}


def test_the_log_cpu_summary_is_its_time_over_the_cpu_of_the_logged_requests():
    clusters = [_alternating("c1", [(1000, 1000)], 0.3, 0.1, 40.0), _alternating("c2", [(3000, 1000)], 0.6, 0.2, 80.0)]
    own = log_cpu_summary(clusters)
    assert own["seconds"] == {"writer": 0.9, "request_path": 0.3}
    assert own["share"] == pytest.approx(1.2 / (40.0 * 0.5 + 80.0 * 0.75), abs=1e-5)  # 1.2 s of 80 s
    assert own["us_per_logged_row"] == 300.0 and own["logged_answers"] == 4000 and own["answers"] == 6000


def test_the_paired_cost_is_the_first_goal_and_its_table_shows_each_cluster():
    clusters = [_alternating("c1", [(1940, 2000), (1940, 2000)], 0.5, 0.1, 20.0)]
    report = {"paired": paired_ratios([(970.0, 1000.0), (970.0, 1000.0)]), "model": "fraud",
              "unlogged_model": "fraud_unlogged", "clusters": clusters, "log_cpu": log_cpu_summary(clusters),
              "config": {"seconds": 60.0, "phase": 2.0, "connections": 64}, "cpu": {"monitor_share_on": [0.002]}}
    goals = cost_goals(report)
    assert goals[0]["value"] == 3.0 and goals[0]["met"] and "2 pairs of alternating phases" in goals[0]["goal"]
    assert len(goals) == 2  # no rounds of clusters: no second cost goal
    wide = cost_goals({"paired": paired_ratios([(990.0, 1000.0), (930.0, 1000.0), (1010.0, 1000.0)])})
    assert wide[0]["value"] < 3.0 and wide[0]["met"] is False  # under the target, but not its interval
    text = cost_markdown({**report, "goals": goals})
    assert "| c1 | 2 | 970 | 1,000 | 0.9700 | 0 | 0.5000 / 0.1000 | - |" in text
    assert "the log costs 3.00 % of peak throughput" in text
    assert "6.09 % of the cluster CPU spent on logged requests" in text  # 0.6 s of 20 s * 3880 / 7880


def test_cost_goals_judge_the_ratio_the_cpu_share_drops_and_missing_rows():
    rounds = [_round(1, True, [980], [0.004]), _round(1, False, [1000], [0.001])]
    report = {"ratio": pair_ratios(rounds), "cpu": {"monitor_share_on": [0.004, None, 0.012]},
              "sustained": {"rate_rps": 800.0, "minutes": 10, "dropped": 0.0, "missing_rows": 3, "answered_200": 10}}
    goals = cost_goals(report)
    assert [g["met"] for g in goals] == [True, False, True, False]
    assert goals[0]["value"] == 2.0 and goals[1]["value"] == 1.2 and goals[1]["gap"] == pytest.approx(0.2)
    assert goals[3]["gap"] == 3
    assert cpu_share(1.0, 400.0) == 0.0025 and cpu_share(None, 1.0) is None and cpu_share(1.0, 0.0) is None
    report.update(rounds=rounds, config={"connections": 64, "repeats": 1, "duration": 8}, goals=goals)
    text = cost_markdown({k: v for k, v in report.items() if k != "sustained"})
    assert "| r1-on | on | 980 | 980 | 5.00 | - | 0.0040 |" in text


def test_cluster_cpu_counts_what_each_process_used_between_two_readings():
    before = CpuReading({10: ("raylet", 5.0), 11: ("ray::Ingress", 20.0), 12: ("gone", 3.0)})
    after = CpuReading({10: ("raylet", 6.5), 11: ("ray::Ingress", 29.0), 13: ("ray::MonitorAc", 0.5)})
    assert ClusterCpu.used(before, after) == pytest.approx(11.0)  # a new process counts from 0
    assert ClusterCpu.by_name(before, after) == {"ray::Ingress": 9.0, "raylet": 1.5, "ray::MonitorAc": 0.5}
    assert before.total_s == 28.0


def test_metric_values_match_labels_exactly_as_given():
    text = ('# HELP fleet_prediction_log_rows_total x\nfleet_prediction_log_rows_total{model="fraud"} 12.0\n'
            'fleet_prediction_log_rows_total{model="fraud_b"} 3.0\nfleet_monitor_cpu_seconds_total 1.5\n')
    assert metric_values(text, "fleet_prediction_log_rows_total", model="fraud") == [12.0]
    assert metric_sum(text, "fleet_prediction_log_rows_total") == 15.0
    assert metric_sum(text, "fleet_monitor_cpu_seconds_total") == 1.5
    assert metric_sum(text, "fleet_prediction_log_dropped_total") is None


def test_compact_snapshots_keep_ratios_to_the_thresholds():
    drift = {"versions": {"1": {"rows": 5000, "alarming": ["amount"], "streams": [
        {"name": "amount", "state": "alarm", "windows": {"rows": {"judged": True, "psi": 0.5, "psi_threshold": 0.1},
                                                         "time": {"judged": False, "psi": 0.5, "psi_threshold": 0.1}},
         "cusum": {"up": 10.0, "down": 50.0, "threshold": 25.0}}]}}}
    assert compact_drift(drift) == {"1": {"rows": 5000, "alarming": ["amount"],
                                          "streams": {"amount": [1, 5.0, None, 2.0]}}}
    quality = {"labels": {"joined": 7}, "versions": {"1": {"rows": {"roc_auc": 0.9, "label_error_rate": 0.02,
                                                                   "rows": 7}, "labelled": 7,
                                                          "label_error": {"state": "ok", "recent_error_rate": 0.01,
                                                                          "p0": 0.015,
                                                                          "cusum": {"value": 4.0, "threshold": 16.0}}}}}
    q = compact_quality(quality)
    assert q["labels"] == {"joined": 7} and q["versions"]["1"]["cusum_ratio"] == 0.25
    assert q["versions"]["1"]["auc"] == 0.9 and compact_drift(None) == {} and compact_quality(None)["versions"] == {}


def test_phase_pairs_follow_the_abba_pattern_and_leave_out_the_lead_in_and_the_cut_last_phase():
    phases = {-1: {"2xx": 500, "other": 0}, **{k: {"2xx": 1000 + k, "other": 0} for k in range(9)}}
    # phases 0..7 make 4 pairs; phase 8, the last, is cut short by wrk's end; -1 is the lead-in
    assert phase_pairs(phases) == [(1000, 1001), (1003, 1002), (1004, 1005), (1007, 1006)]
    phases[5] = {"2xx": 0, "other": 40}  # a phase with no answer at all: its pair is left out
    assert phase_pairs(phases) == [(1000, 1001), (1003, 1002), (1007, 1006)]
    assert phase_pairs({}) == [] and phase_pairs({0: {"2xx": 5, "other": 0}}) == []
    out = 'x\nWRK_PHASES {"errors":2,"phases":{"0":{"2xx":7,"other":1},"-1":{"2xx":3,"other":0}}}\n'
    assert parse_phases(out) == {"phases": {0: {"2xx": 7, "other": 1}, -1: {"2xx": 3, "other": 0}}, "errors": 2}
    with pytest.raises(WrkError):
        parse_phases("no report")
