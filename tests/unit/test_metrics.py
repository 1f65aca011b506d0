"""Replica statistics (serving/metrics.py) and the monitor's cluster-wide view (serving/monitor.py), without Ray.

The monitor's Prometheus text is read back with prometheus_client's own parser,
as a Prometheus server would read it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2

from cluster import prometheus
from serving import monitor as monitor_module
from serving.cache import ResponseCache
from serving.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, ModelStats, StatsRecorder, merge_stats
from serving.monitor import MonitorState, triton_model_stats

MS = 1_000_000  # ns


def scrape(state: MonitorState) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from the rendered exposition text."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(state.render().decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def labels(model: str, version: str, **extra) -> tuple:
    return tuple(sorted({"model": model, "version": version, **extra}.items()))


def buckets(samples: dict, name: str, model: str, version: str) -> list[tuple[float, float]]:
    """[(le, cumulative count)] in bound order for one series of a histogram."""
    out = []
    for key, value in samples[f"{name}_bucket"].items():
        d = dict(key)
        if d["model"] == model and d["version"] == version:
            out.append((float(d["le"]), value))
    return sorted(out)


# -- the replica side ------------------------------------------------------------------


def test_recorder_counts_requests_batches_and_failures():
    rec = StatsRecorder()
    before_ms = int(time.time() * 1000)
    rec.success("fraud", "1", total_ns=3 * MS, queue_ns=1 * MS, compute_ns=2 * MS)
    rec.success("fraud", "1", total_ns=1 * MS, queue_ns=0, compute_ns=1 * MS)  # exactly on a bound
    rec.success("fraud", "2", total_ns=20_000 * MS, queue_ns=0, compute_ns=0)  # past the last bound
    rec.failure("fraud", "1", "DeadlineExceeded", 5 * MS)
    rec.failure("fraud", "1", "DeadlineExceeded", 5 * MS)
    rec.failure("fraud", "1", "BackendError", 1 * MS)
    rec.batch("fraud", "1", rows=4, compute_ns=2 * MS, ok=True)
    rec.batch("fraud", "1", rows=4, compute_ns=4 * MS, ok=True)
    rec.batch("fraud", "1", rows=1, compute_ns=1 * MS, ok=True)
    rec.batch("fraud", "1", rows=8, compute_ns=9 * MS, ok=False)  # a failed batch inferred nothing
    stats = rec.take()
    assert set(stats) == {("fraud", "1"), ("fraud", "2")}
    s = stats[("fraud", "1")]
    assert s.success == 2 and s.request_ns == 4 * MS and s.queue_ns == 1 * MS and s.compute_ns == 3 * MS
    assert s.failure == {"DeadlineExceeded": 2, "BackendError": 1} and s.fail_ns == 11 * MS
    assert (s.execution_count, s.inference_count) == (3, 9)
    assert s.batch_sizes == {4: [2, 6 * MS], 1: [1, 1 * MS]}
    # Latency buckets are Prometheus' "le": 1 ms counts in the 0.001 bucket, 3 ms in 0.005.
    assert s.latency_buckets[LATENCY_BUCKETS_S.index(0.001)] == 1
    assert s.latency_buckets[LATENCY_BUCKETS_S.index(0.005)] == 1
    assert sum(s.latency_buckets) == 2
    assert stats[("fraud", "2")].latency_buckets[-1] == 1  # 20 s: only in +Inf
    assert before_ms <= s.last_inference_ms <= int(time.time() * 1000)
    assert rec.take() == {}  # taken: the next delta starts from zero


def test_a_delta_given_back_goes_out_with_the_next_one():
    rec = StatsRecorder()
    rec.success("fraud", "1", 2 * MS, 0, 1 * MS)
    rec.batch("fraud", "1", 3, 1 * MS, True)
    lost = rec.take()
    rec.success("fraud", "1", 4 * MS, 0, 1 * MS)
    rec.give_back(lost)  # the push failed: nothing may be lost or counted twice
    s = rec.take()[("fraud", "1")]
    assert s.success == 2 and s.request_ns == 6 * MS
    assert (s.execution_count, s.inference_count) == (1, 3)


def test_merge_stats_adds_up_and_does_not_alias_the_delta():
    a, b = StatsRecorder(), StatsRecorder()
    a.success("m", "1", 1 * MS, 0, 0)
    a.batch("m", "1", 2, 5, True)
    b.success("m", "1", 30 * MS, 0, 0)
    b.failure("m", "1", "Overloaded", 7)
    b.batch("m", "1", 2, 6, True)
    b.batch("m", "1", 64, 9, True)
    totals: dict = {}
    delta_a = a.take()
    merge_stats(totals, delta_a)
    merge_stats(totals, b.take())
    delta_a[("m", "1")].success += 100  # a replica reusing its object must not change the totals
    t = totals[("m", "1")]
    assert t.success == 2 and t.failure == {"Overloaded": 1}
    assert t.batch_sizes == {2: [2, 11], 64: [1, 9]}
    assert (t.execution_count, t.inference_count) == (3, 68)
    assert sum(t.latency_buckets) == 2
    # What the monitor hands out over Ray comes back the same.
    assert ModelStats.from_dict(json.loads(json.dumps(t.to_dict()))) == t


# -- the monitor ---------------------------------------------------------------------------


def two_replicas() -> MonitorState:
    """Two ingress replicas push two rounds of deltas each."""
    state = MonitorState()
    r1, r2 = StatsRecorder(), StatsRecorder()
    for _ in range(3):
        r1.success("fraud", "1", 1 * MS, 100_000, 400_000)  # 1 ms
    r1.success("fraud", "1", 30 * MS, 10 * MS, 15 * MS)  # 30 ms
    r1.batch("fraud", "1", 4, 400_000, True)
    r1.failure("fraud", "1", "DeadlineExceeded", 9 * MS)
    state.push("replica-1", r1.take(), {("fraud", "1"): 3})
    r2.success("fraud", "1", 200 * MS, 0, 100 * MS)  # 200 ms
    r2.success("digits", "2", 2 * MS, 0, 1 * MS)
    r2.batch("fraud", "1", 1, 100 * MS, True)
    r2.batch("digits", "2", 1, 1 * MS, True)
    r2.failure("fraud", "1", "DeadlineExceeded", 1 * MS)
    r2.failure("fraud", "1", "InvalidInput", 0)
    state.push("replica-2", r2.take(), {("fraud", "1"): 2, ("digits", "2"): 1})
    r1.success("fraud", "1", 3 * MS, 0, 0)  # 3 ms, second round
    r1.batch("fraud", "1", 1, 0, True)
    state.push("replica-1", r1.take(), {("fraud", "1"): 4})
    return state


def test_monitor_renders_cluster_wide_counters():
    samples = scrape(two_replicas())
    fraud, digits = labels("fraud", "1"), labels("digits", "2")
    assert samples["fleet_inference_request_success_total"] == {fraud: 6.0, digits: 1.0}
    assert samples["fleet_inference_request_failure_total"] == {
        labels("fraud", "1", reason="DeadlineExceeded"): 2.0,
        labels("fraud", "1", reason="InvalidInput"): 1.0,
    }
    assert samples["fleet_inference_count_total"] == {fraud: 6.0, digits: 1.0}
    assert samples["fleet_inference_exec_count_total"] == {fraud: 3.0, digits: 1.0}
    # Cumulative times in seconds; the request time is also the latency histogram's sum.
    assert samples["fleet_inference_request_time_seconds_total"][fraud] == pytest.approx((3 * 1 + 30 + 200 + 3) / 1e3)
    assert samples["fleet_inference_request_time_seconds_total"][fraud] == \
        pytest.approx(samples["fleet_inference_request_duration_seconds_sum"][fraud])
    assert samples["fleet_inference_queue_time_seconds_total"][fraud] == pytest.approx((0.3 + 10) / 1e3)
    assert samples["fleet_inference_compute_infer_time_seconds_total"][fraud] == pytest.approx((1.2 + 15 + 100) / 1e3)


def test_latency_histogram_buckets_are_cumulative_and_match_the_counts():
    samples = scrape(two_replicas())
    name = "fleet_inference_request_duration_seconds"
    series = buckets(samples, name, "fraud", "1")
    bounds = [le for le, _ in series]
    assert bounds == sorted(LATENCY_BUCKETS_S) + [float("inf")]
    counts = [n for _, n in series]
    assert counts == sorted(counts)  # cumulative: never decreasing
    assert counts[-1] == samples[f"{name}_count"][labels("fraud", "1")] == 6
    by_bound = dict(series)
    assert by_bound[0.0005] == 0
    assert by_bound[0.001] == 3  # the three 1 ms requests: "le" includes the bound
    assert by_bound[0.005] == 4  # + 3 ms
    assert by_bound[0.05] == 5  # + 30 ms
    assert by_bound[0.2] == 6  # + 200 ms
    assert samples[f"{name}_sum"][labels("fraud", "1")] == pytest.approx(0.003 + 0.030 + 0.200 + 0.003)
    assert buckets(samples, name, "digits", "2")[-1][1] == 1


def test_batch_size_histogram_is_cumulative_and_sums_rows():
    samples = scrape(two_replicas())
    name = "fleet_inference_batch_size"
    series = buckets(samples, name, "fraud", "1")
    assert [le for le, _ in series] == [float(b) for b in BATCH_BUCKETS] + [float("inf")]
    counts = [n for _, n in series]
    assert counts == sorted(counts)
    by_bound = dict(series)
    assert by_bound[1.0] == 2 and by_bound[2.0] == 2 and by_bound[4.0] == 3
    assert counts[-1] == samples[f"{name}_count"][labels("fraud", "1")] == 3  # executions
    assert samples[f"{name}_sum"][labels("fraud", "1")] == 6  # rows


def test_queue_depth_gauges_sum_fresh_replicas_only(monkeypatch):
    state = two_replicas()
    samples = scrape(state)
    gauge = "fleet_inference_pending_requests"
    # replica-1's latest report replaced its earlier one; replica-2's is added.
    assert samples[gauge] == {labels("fraud", "1"): 6.0, labels("digits", "2"): 1.0}

    class LaterClock:
        offset = 0.0

        @staticmethod
        def monotonic():
            return time.monotonic() + LaterClock.offset

    monkeypatch.setattr(monitor_module, "time", LaterClock)
    LaterClock.offset = 30.0  # nobody reported for 30 s: the depths are stale, not zero-filled
    assert gauge not in scrape(state) or scrape(state)[gauge] == {}
    state.push("replica-2", {}, {("fraud", "1"): 7})  # replica-2 is alive again
    assert scrape(state)[gauge] == {labels("fraud", "1"): 7.0}
    state.forget("replica-2")  # and then goes away for good
    assert gauge not in scrape(state) or scrape(state)[gauge] == {}
    # Counters do not go stale: they are totals.
    assert scrape(state)["fleet_inference_request_success_total"][labels("fraud", "1")] == 6.0


def test_an_empty_monitor_renders_valid_text():
    families = {f.name: f for f in text_string_to_metric_families(MonitorState().render().decode())}
    assert {"fleet_inference_request_success", "fleet_inference_request_duration_seconds",
            "fleet_inference_pending_requests"} <= set(families)
    assert all(not f.samples for f in families.values())


# -- Triton's statistics document ---------------------------------------------------------------


def test_triton_model_stats_has_tritons_shape():
    state = two_replicas()
    raw = state.totals()[("fraud", "1")]
    doc = triton_model_stats("fraud", "1", ModelStats.from_dict(raw))
    json.dumps(doc)  # plain JSON, as the HTTP endpoint returns it
    assert doc["name"] == "fraud" and doc["version"] == "1"
    assert doc["inference_count"] == 6 and doc["execution_count"] == 3
    assert doc["execution_count"] < doc["inference_count"]  # batches had several rows
    stats = doc["inference_stats"]
    assert stats["success"] == {"count": 6, "ns": (3 * 1 + 30 + 200 + 3) * MS}
    assert stats["fail"] == {"count": 3, "ns": 10 * MS}
    assert stats["queue"] == {"count": 6, "ns": 300_000 + 10 * MS}
    assert stats["compute_infer"]["count"] == 6
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in doc["batch_stats"]} == {1: 2, 4: 1}
    assert [b["batch_size"] for b in doc["batch_stats"]] == [1, 4]
    assert doc["last_inference"] > 0
    # Everything but fleet's extra failure breakdown is a field of Triton's ModelStatistics message.
    extra = {k: v for k, v in doc.items() if k != "failure_reasons"}
    parsed = json_format.ParseDict(extra, service_pb2.ModelStatistics())
    assert parsed.inference_count == 6 and parsed.execution_count == 3
    assert parsed.inference_stats.success.count == 6
    assert [b.batch_size for b in parsed.batch_stats] == [1, 4]
    assert doc["failure_reasons"] == {"DeadlineExceeded": 2, "InvalidInput": 1}


def test_triton_model_stats_of_an_idle_model_is_all_zero():
    doc = triton_model_stats("digits", "1", ModelStats())
    json_format.ParseDict({k: v for k, v in doc.items() if k != "failure_reasons"}, service_pb2.ModelStatistics())
    assert doc["inference_count"] == doc["execution_count"] == doc["last_inference"] == 0
    assert doc["batch_stats"] == []
    assert all(v == {"count": 0, "ns": 0} for v in doc["inference_stats"].values())


def test_breaker_gauge_counts_the_replicas_whose_breaker_is_open_and_forgets_a_replica_gone():
    state = MonitorState()
    state.push("a", {}, {}, {"fraud_triton": 1})
    state.push("b", {}, {}, {"fraud_triton": 1})
    state.push("c", {}, {}, {"fraud_triton": 0})
    assert scrape(state)["fleet_breaker_open"] == {(("model", "fraud_triton"),): 2.0}
    state.forget("a")
    state.push("b", {}, {}, {"fraud_triton": 0})
    assert scrape(state)["fleet_breaker_open"] == {(("model", "fraud_triton"),): 0.0}


# -- what a Prometheus server makes of it ---------------------------------------------------------------


def busy_cluster() -> MonitorState:
    """A monitor as a busy cluster leaves it: three replicas, several models and versions, every failure
    reason, batches of many sizes, latencies past the last bucket, feature histograms, open breakers."""
    import numpy as np

    rng = np.random.default_rng(7)
    state = MonitorState()
    reasons = ["InvalidInput", "Overloaded", "DeadlineExceeded", "BackendError", "ModelUnavailable", "Cancelled"]
    for r, replica in enumerate(("ingress-0", "ingress-1", "ingress-2")):
        rec = StatsRecorder()
        for model, version in (("fraud", "1"), ("fraud", "2"), ("digits", "1"), ("fraud-triton.eu", "3")):
            for latency_s in rng.lognormal(-6, 2, 200):  # 2.5 ms median, some beyond 10 s
                ns = int(latency_s * 1e9)
                rec.success(model, version, ns, ns // 3, ns // 2)
            for size in rng.integers(1, 1500, 40):
                rec.batch(model, version, int(size), int(size) * 20_000, True)
            for reason in reasons[: 2 + r]:
                rec.failure(model, version, reason, 3 * MS)
        rec.features("fraud", "2", rng.integers(0, 1000, (30, 22)))
        rec.features("digits", "1", rng.integers(0, 1000, (64, 12)))
        cache = ResponseCache(16 * 1024)  # small: it evicts, and refuses the largest answers
        rec.track_cache(cache)
        for i in rng.integers(0, 40, 100):
            for model, version in (("fraud", 1), ("digits", 1)):
                key = f"{model}/{i}".encode()
                if cache.get(key, model, version) is None:
                    cache.put(key, [("y", "FP32", np.zeros(1 + int(i) ** 3 // 15, np.float32))], model, version)
        stats, monitoring = rec.take(), rec.take_monitoring()
        state.push(replica, stats, {("fraud", "1"): r, ("fraud", "2"): 3, ("digits", "1"): 0},
                   {"fraud-triton.eu": int(r > 0), "fraud": 0}, monitoring["cache"])
    return state


@pytest.mark.parametrize("state", [busy_cluster, two_replicas, MonitorState], ids=["busy", "two-replicas", "empty"])
def test_promtool_finds_nothing_wrong_with_the_metrics(state):
    """The real `promtool check metrics`, Prometheus' own linter: base units, suffixes, types, help."""
    text = state().render().decode()
    assert "fleet_inference_request_success_total" in text or state is MonitorState
    assert prometheus.check_metrics(text) == ""


def test_promtool_check_metrics_does_report_a_bad_name():
    # The check above passes because the names are right, not because promtool stays quiet.
    bad = "# HELP fleet_x_duration_us_total t\n# TYPE fleet_x_duration_us_total counter\nfleet_x_duration_us_total 1\n"
    assert "abbreviated units" in prometheus.check_metrics(bad)


# -- the response cache ------------------------------------------------------------------------------------


def cached_replica(state: MonitorState, replica: str, hits: int, misses: int, capacity: int = 1 << 20) -> StatsRecorder:
    """A replica whose cache answered `hits` fraud/1 lookups and computed `misses` (each stored), pushed."""
    rec, cache = StatsRecorder(), ResponseCache(capacity)
    rec.track_cache(cache)
    for i in range(misses):
        assert cache.get(i.to_bytes(16, "little"), "fraud", 1) is None
        cache.put(i.to_bytes(16, "little"), [("probability", "FP32", np.zeros((1, 1), np.float32))], "fraud", 1)
    for _ in range(hits):
        assert cache.get((misses - 1).to_bytes(16, "little"), "fraud", 1) is not None  # the latest stays
        rec.success("fraud", "1", 50_000, 0, 0)  # a hit is a success too, neither queued nor computed
    for _ in range(misses):
        rec.success("fraud", "1", 2 * MS, 1 * MS, 1 * MS)
    stats, monitoring = rec.take(), rec.take_monitoring()
    state.push(replica, stats, {}, {}, monitoring.get("cache"))
    return rec


def test_the_response_cache_families_add_up_over_replicas(monkeypatch):
    state = MonitorState()
    cached_replica(state, "a", hits=5, misses=2)
    cached_replica(state, "b", hits=1, misses=3, capacity=2 * (320 + 336 + 4))  # holds two: one eviction
    samples = scrape(state)
    fraud = labels("fraud", "1")
    assert samples["fleet_cache_hits_total"] == {fraud: 6.0}
    assert samples["fleet_cache_misses_total"] == {fraud: 5.0}
    assert samples["fleet_cache_hit_time_seconds_total"][fraud] > 0
    assert samples["fleet_cache_miss_time_seconds_total"][fraud] > 0
    assert samples["fleet_cache_evictions_total"] == {(): 1.0}
    assert samples["fleet_cache_oversize_total"] == {(): 0.0}
    assert samples["fleet_cache_entries"] == {(): 4.0}  # 2 + 2
    assert samples["fleet_cache_bytes"] == {(): 4 * (320 + 336 + 4)}
    assert samples["fleet_cache_capacity_bytes"] == {(): (1 << 20) + 2 * (320 + 336 + 4)}
    # Triton's statistics: cache hits are successes, but neither queued nor computed.
    doc = triton_model_stats("fraud", "1", ModelStats.from_dict(state.totals()[("fraud", "1")]))
    stats = doc["inference_stats"]
    assert stats["success"]["count"] == 11
    assert stats["cache_hit"]["count"] == 6 and stats["cache_hit"]["ns"] > 0
    assert stats["cache_miss"]["count"] == 5 and stats["cache_miss"]["ns"] > 0
    assert stats["queue"]["count"] == stats["compute_infer"]["count"] == 5
    parsed = json_format.ParseDict({k: v for k, v in doc.items() if k != "failure_reasons"},
                                   service_pb2.ModelStatistics())
    assert parsed.inference_stats.cache_hit.count == 6
    # A replica gone: its gauges leave with it, the counters stay.
    state.forget("b")
    samples = scrape(state)
    assert samples["fleet_cache_entries"] == {(): 2.0} and samples["fleet_cache_evictions_total"] == {(): 1.0}
    # Gauges of replicas that stopped reporting are stale, not summed.
    class LaterClock:
        @staticmethod
        def monotonic():
            return time.monotonic() + 30.0

    monkeypatch.setattr(monitor_module, "time", LaterClock)
    assert not scrape(state).get("fleet_cache_entries")


def test_a_model_without_cache_renders_no_cache_series():
    samples = scrape(two_replicas())
    assert not samples.get("fleet_cache_hits_total") and not samples.get("fleet_cache_entries")
    assert not samples.get("fleet_cache_evictions_total")


def test_cache_counts_given_back_go_out_with_the_next_push():
    rec, cache = StatsRecorder(), ResponseCache(320 + 336 + 4)  # room for one answer
    rec.track_cache(cache)
    for i in range(3):
        cache.get(bytes([i]) * 16, "fraud", 1)
        cache.put(bytes([i]) * 16, [("p", "FP32", np.zeros(1, np.float32))], "fraud", 1)
    lost_stats, lost = rec.take(), rec.take_monitoring()
    assert lost["cache"]["evictions"] == 2 and lost_stats[("fraud", "1")].cache_misses == 3
    cache.put(b"x" * 16, [("p", "FP32", np.zeros(1, np.float32))], "fraud", 1)  # one more eviction
    rec.give_back(lost_stats)  # the push failed
    rec.give_back_monitoring(lost)
    stats, monitoring = rec.take(), rec.take_monitoring()
    assert stats[("fraud", "1")].cache_misses == 3
    assert monitoring["cache"]["evictions"] == 3 and monitoring["cache"]["entries"] == 1
    assert "cache" not in rec.take_monitoring() or rec.take_monitoring()["cache"]["evictions"] == 0
