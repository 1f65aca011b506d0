"""The monitor: one named, detached actor that adds up every ingress replica's statistics.

Replicas push deltas about once a second (`MonitorState.push`); the monitor
renders cluster-wide Prometheus metrics and Triton-style statistics from the
totals. `MonitorState` is plain Python (unit-tested without Ray); `get_monitor`
wraps it as the actor.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from serving.metrics import BATCH_BUCKETS, LATENCY_BUCKETS_S, ModelStats, merge_stats

__all__ = ["MONITOR_NAME", "MONITOR_NAMESPACE", "MonitorState", "get_monitor", "triton_model_stats"]

MONITOR_NAME = "fleet-monitor"
MONITOR_NAMESPACE = "fleet"
_GAUGE_STALE_S = 10.0
_CACHE_GAUGES = ("entries", "bytes", "capacity_bytes")


def _sum_fresh(reports: dict[str, tuple[float, dict]]) -> dict:
    """Per key, the sum of the replicas' last reports ({replica: (when, {key: n})}) made within _GAUGE_STALE_S:
    a gauge of the cluster now, without the replicas that stopped reporting."""
    now = time.monotonic()
    out: dict = {}
    for stamp, values in reports.values():
        if now - stamp <= _GAUGE_STALE_S:
            for key, n in values.items():
                out[key] = out.get(key, 0) + n
    return out


class MonitorState:
    """Cluster-wide totals; the actor's whole state."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], ModelStats] = {}
        self._depths: dict[str, tuple[float, dict[tuple[str, str], int]]] = {}
        self._breakers: dict[str, tuple[float, dict[str, int]]] = {}  # replica -> (when, {model: 1 if not closed})
        # The response caches (serving/cache.py): replica -> (when, {entries, bytes, capacity_bytes}) ...
        self._caches: dict[str, tuple[float, dict[str, int]]] = {}
        self._cache_events: dict[str, int] | None = None  # ... and {evictions, oversize} of them all; None: no cache
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def push(self, replica: str, delta: dict, queue_depths: dict | None = None,
             breakers: dict | None = None, cache: dict | None = None) -> None:
        """Add one replica's delta {(model, version): ModelStats}, its current queue depths, its circuit
        breakers ({model: 1 when open or probing, 0 when closed}) and its response cache (the "cache"
        of `StatsRecorder.take_monitoring`: evictions and oversize since its last push, entries, bytes and
        capacity_bytes now)."""
        merge_stats(self._totals, delta)
        if cache is not None:
            self._caches[replica] = (time.monotonic(), {k: int(cache.get(k, 0)) for k in _CACHE_GAUGES})
            events = self._cache_events = self._cache_events or {"evictions": 0, "oversize": 0}
            for k in events:
                events[k] += int(cache.get(k, 0))
        if queue_depths is not None:
            self._depths[replica] = (time.monotonic(), dict(queue_depths))
        if breakers is not None:
            self._breakers[replica] = (time.monotonic(), dict(breakers))

    def forget(self, replica: str) -> None:
        self._depths.pop(replica, None)
        self._breakers.pop(replica, None)
        self._caches.pop(replica, None)

    def cache_gauges(self) -> dict[str, int]:
        """The response caches' entries, bytes and capacity_bytes now, summed over the replicas that reported
        within the last few seconds; {} when none did."""
        return _sum_fresh(self._caches)

    def breakers_open(self) -> dict[str, int]:
        """Per model with a breaker: how many ingress replicas have it open (or probing) now."""
        return _sum_fresh(self._breakers)

    def totals(self) -> dict:
        return {k: v.to_dict() for k, v in self._totals.items()}

    def queue_depths(self) -> dict[tuple[str, str], int]:
        return _sum_fresh(self._depths)

    def render(self) -> bytes:
        """Prometheus text exposition of the cluster-wide totals."""
        return generate_latest(self._registry)

    # prometheus_client custom-collector protocol
    def collect(self):
        labels = ["model", "version"]

        def counter(name, doc, attr, scale=1.0):
            fam = CounterMetricFamily(name, doc, labels=labels)
            for (m, v), s in sorted(self._totals.items()):
                fam.add_metric([m, v], getattr(s, attr) * scale)
            return fam

        yield counter("fleet_inference_request_success", "Successful inference requests", "success")
        failure = CounterMetricFamily(
            "fleet_inference_request_failure", "Failed inference requests by reason", labels=labels + ["reason"]
        )
        for (m, v), s in sorted(self._totals.items()):
            for reason, n in sorted(s.failure.items()):
                failure.add_metric([m, v, reason], n)
        yield failure
        yield counter("fleet_inference_count", "Inferences performed (batch rows)", "inference_count")
        yield counter("fleet_inference_exec_count", "Model executions (batches)", "execution_count")
        # Cumulative times in base units (seconds), named `_time_seconds` so that none of them can collide
        # with a histogram's `_duration_seconds_{bucket,sum,count}` series.
        yield counter(
            "fleet_inference_request_time_seconds", "Cumulative end-to-end time of successful requests, seconds",
            "request_ns", 1e-9,
        )
        yield counter(
            "fleet_inference_queue_time_seconds", "Cumulative time requests waited in queue, seconds", "queue_ns", 1e-9
        )
        yield counter(
            "fleet_inference_compute_infer_time_seconds", "Cumulative compute time seen by requests, seconds",
            "compute_ns", 1e-9,
        )
        latency = HistogramMetricFamily(
            "fleet_inference_request_duration_seconds", "End-to-end latency of successful requests", labels=labels
        )
        for (m, v), s in sorted(self._totals.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS_S, s.latency_buckets):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", cumulative + s.latency_buckets[-1]))
            latency.add_metric([m, v], buckets, s.request_ns / 1e9)
        yield latency
        batch = HistogramMetricFamily("fleet_inference_batch_size", "Rows per model execution", labels=labels)
        for (m, v), s in sorted(self._totals.items()):
            counts = [0] * (len(BATCH_BUCKETS) + 1)
            total_rows = 0
            for size, (n, _ns) in s.batch_sizes.items():
                idx = next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS))
                counts[idx] += n
                total_rows += size * n
            cumulative, buckets = 0, []
            for bound, n in zip(BATCH_BUCKETS, counts):
                cumulative += n
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            batch.add_metric([m, v], buckets, total_rows)
        yield batch
        depth = GaugeMetricFamily(
            "fleet_inference_pending_requests", "Requests waiting in batcher queues now", labels=labels
        )
        for (m, v), n in sorted(self.queue_depths().items()):
            depth.add_metric([m, v], n)
        yield depth
        breaker = GaugeMetricFamily(
            "fleet_breaker_open", "Ingress replicas whose circuit breaker in front of the model's backend is open "
            "or probing (its batches go to the fallback, or get 503)", labels=["model"]
        )
        for m, n in sorted(self.breakers_open().items()):
            breaker.add_metric([m], n)
        yield breaker
        yield from self._collect_cache(labels)

    def _collect_cache(self, labels: list[str]):
        """The response cache, named after Triton's nv_cache_* (per model version: only those looked up)."""
        looked_up = [(key, s) for key, s in sorted(self._totals.items()) if s.cache_hits or s.cache_misses]
        for name, doc, attr, scale in (
            ("fleet_cache_hits", "Requests answered from the response cache", "cache_hits", 1),
            ("fleet_cache_misses", "Response-cache lookups that found no answer (the request was computed)",
             "cache_misses", 1),
            ("fleet_cache_hit_time_seconds", "Cumulative time of response-cache lookups that hit, seconds",
             "cache_hit_ns", 1e-9),
            ("fleet_cache_miss_time_seconds", "Cumulative time of response-cache lookups that missed and of "
             "storing the computed answers, seconds", "cache_miss_ns", 1e-9),
        ):
            fam = CounterMetricFamily(name, doc, labels=labels)
            for (m, v), s in looked_up:
                fam.add_metric([m, v], getattr(s, attr) * scale)
            yield fam
        events = self._cache_events
        for name, doc, key in (
            ("fleet_cache_evictions", "Answers evicted from the ingress replicas' response caches to make room "
             "(least recently used first)", "evictions"),
            ("fleet_cache_oversize", "Answers larger than a whole response cache (response_cache_bytes), not "
             "stored", "oversize"),
        ):
            fam = CounterMetricFamily(name, doc)
            if events is not None:
                fam.add_metric([], events[key])
            yield fam
        gauges = self.cache_gauges()
        for name, doc, key in (
            ("fleet_cache_entries", "Answers held in the response caches now (summed over ingress replicas, "
             "each of which has its own cache)", "entries"),
            ("fleet_cache_bytes", "Bytes the response caches hold now, with their per-entry overhead (summed "
             "over ingress replicas, each with its own cache)", "bytes"),
            ("fleet_cache_capacity_bytes", "The response caches' size: response_cache_bytes per ingress replica, "
             "summed (utilisation: fleet_cache_bytes / this)", "capacity_bytes"),
        ):
            fam = GaugeMetricFamily(name, doc)
            if gauges:
                fam.add_metric([], gauges.get(key, 0))
            yield fam


def triton_model_stats(model: str, version: str, s: ModelStats) -> dict:
    """One entry of Triton's `GET /v2/models/{m}/stats` `model_stats` list."""

    def dur(count: int, ns: int) -> dict:
        return {"count": count, "ns": ns}

    failures = sum(s.failure.values())
    computed = max(0, s.success - s.cache_hits)  # Triton leaves answers from the cache out of queue and compute
    return {
        "name": model,
        "version": version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": dur(s.success, s.request_ns),
            "fail": dur(failures, s.fail_ns),
            "queue": dur(computed, s.queue_ns),
            "compute_input": dur(computed, 0),
            "compute_infer": dur(computed, s.compute_ns),
            "compute_output": dur(computed, 0),
            "cache_hit": dur(s.cache_hits, s.cache_hit_ns),
            "cache_miss": dur(s.cache_misses, s.cache_miss_ns),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": dur(n, 0),
                "compute_infer": dur(n, ns),
                "compute_output": dur(n, 0),
            }
            for size, (n, ns) in sorted(s.batch_sizes.items())
        ],
        "failure_reasons": dict(s.failure),
    }


def get_monitor(options: dict | None = None):
    """The cluster's monitor actor, created on first use (named, detached, no CPU; serving/monitoring/actor.py).

    `options` (the serving options as a dict) configure its monitoring when this call creates it;
    a replica's later call changes nothing (every replica of one deployment has the same options).
    """
    import ray

    from serving.monitoring.actor import MonitorActor

    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=8)(MonitorActor)
    return actor_cls.options(
        name=MONITOR_NAME, namespace=MONITOR_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(options)
