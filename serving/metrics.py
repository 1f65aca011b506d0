"""Per-replica inference statistics, kept locally and handed off as deltas.

The hot path only adds to integers in a dict; an ingress replica sends what
accumulated since the last hand-off to the monitor actor about once a second.
No Ray and no I/O here.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "LATENCY_BUCKETS_S",
    "BATCH_BUCKETS",
    "ModelStats",
    "StatsRecorder",
    "merge_stats",
]

# End-to-end request latency histogram bounds, seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class ModelStats:
    """Counters for one (model, version); every field adds up across replicas."""

    success: int = 0
    failure: dict[str, int] = field(default_factory=dict)  # reason -> count
    inference_count: int = 0  # batch rows inferred
    execution_count: int = 0  # batches executed
    request_ns: int = 0  # end to end, successful requests
    queue_ns: int = 0
    compute_ns: int = 0  # per request: its batch's compute time
    fail_ns: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # rows -> [executions, compute ns]
    last_inference_ms: int = 0
    # Live feature histograms of a model that counts them (serving/preprocess.py): per feature,
    # [underflow, bin 0 .. bin b-1, overflow] against its reference edges; [] until counted.
    feature_counts: list[list[int]] = field(default_factory=list)
    # The response cache (serving/cache.py): lookups that found / did not find the answer, and the time
    # they took (a miss's includes storing the computed answer, as Triton counts it). A hit is also a success.
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_ns: int = 0
    cache_miss_ns: int = 0

    def merge(self, other: "ModelStats") -> None:
        self.success += other.success
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.cache_hit_ns += other.cache_hit_ns
        self.cache_miss_ns += other.cache_miss_ns
        for reason, n in other.failure.items():
            self.failure[reason] = self.failure.get(reason, 0) + n
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.request_ns += other.request_ns
        self.queue_ns += other.queue_ns
        self.compute_ns += other.compute_ns
        self.fail_ns += other.fail_ns
        for i, n in enumerate(other.latency_buckets):
            self.latency_buckets[i] += n
        for size, (count, ns) in other.batch_sizes.items():
            entry = self.batch_sizes.setdefault(size, [0, 0])
            entry[0] += count
            entry[1] += ns
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        if other.feature_counts:
            self.add_feature_counts(other.feature_counts)

    def add_feature_counts(self, counts) -> None:
        """Add per-feature bin counts (a [d][bins] list or int array); a change of shape starts afresh."""
        rows = [list(map(int, row)) for row in counts]
        if not self.feature_counts or [len(r) for r in self.feature_counts] != [len(r) for r in rows]:
            self.feature_counts = rows
            return
        for mine, theirs in zip(self.feature_counts, rows):
            for k, n in enumerate(theirs):
                mine[k] += n

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "failure": dict(self.failure),
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "request_ns": self.request_ns,
            "queue_ns": self.queue_ns,
            "compute_ns": self.compute_ns,
            "fail_ns": self.fail_ns,
            "latency_buckets": list(self.latency_buckets),
            "batch_sizes": {str(k): list(v) for k, v in self.batch_sizes.items()},
            "last_inference_ms": self.last_inference_ms,
            "feature_counts": [list(r) for r in self.feature_counts],
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_hit_ns": self.cache_hit_ns,
            "cache_miss_ns": self.cache_miss_ns,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelStats":
        s = cls(**{k: v for k, v in d.items()
                   if k not in ("batch_sizes", "failure", "latency_buckets", "feature_counts")})
        s.feature_counts = [list(r) for r in d.get("feature_counts", [])]
        s.failure = dict(d.get("failure", {}))
        s.latency_buckets = list(d.get("latency_buckets", s.latency_buckets))
        s.batch_sizes = {int(k): list(v) for k, v in d.get("batch_sizes", {}).items()}
        return s


def merge_stats(into: dict, delta: dict) -> None:
    """Add a {(model, version): ModelStats} delta into a running total."""
    for key, stats in delta.items():
        if key in into:
            into[key].merge(stats)
        else:
            total = ModelStats()
            total.merge(stats)
            into[key] = total


class StatsRecorder:
    """Accumulates one replica's statistics between hand-offs."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._features: dict[tuple[str, str], "np.ndarray"] = {}  # feature bin counts since the last take()
        # The drift monitor's steps: per (model, version) {"features"|"score"|"pca": int64 counts, "rows": n}
        self._drift: dict[tuple[str, str], dict] = {}
        self._violations: dict[tuple[str, str, str], int] = {}  # (model, feature, rule) -> rows
        self._feedback: dict[str, dict[str, int]] = {}  # model -> {"labels", "duplicates"}
        self._cache = None  # the response cache whose counts every take pulls (track_cache)
        # Its latest entries, bytes, capacity_bytes, and the evictions, oversize since the last take_monitoring.
        self._cache_state: dict[str, int] | None = None

    def _get(self, model: str, version: str) -> ModelStats:
        key = (model, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats()
        return stats

    def success(self, model: str, version: str, total_ns: int, queue_ns: int, compute_ns: int) -> None:
        s = self._get(model, version)
        s.success += 1
        s.request_ns += total_ns
        s.queue_ns += queue_ns
        s.compute_ns += compute_ns
        s.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_S, total_ns / 1e9)] += 1
        s.last_inference_ms = int(time.time() * 1000)

    def failure(self, model: str, version: str, reason: str, total_ns: int) -> None:
        s = self._get(model, version)
        s.failure[reason] = s.failure.get(reason, 0) + 1
        s.fail_ns += total_ns

    def batch(self, model: str, version: str, rows: int, compute_ns: int, ok: bool) -> None:
        if not ok:
            return
        s = self._get(model, version)
        s.execution_count += 1
        s.inference_count += rows
        entry = s.batch_sizes.get(rows)
        if entry is None:
            s.batch_sizes[rows] = [1, compute_ns]
        else:
            entry[0] += 1
            entry[1] += compute_ns

    def features(self, model: str, version: str, counts) -> None:
        """Add one batch's feature bin counts (int64 [d, bins + 2]): one array addition, no Python loop."""
        key = (model, version)
        total = self._features.get(key)
        if total is None or total.shape != counts.shape:
            self._features[key] = counts.copy()
        else:
            total += counts

    def drift(self, model: str, version: str, counts: dict, rows: int) -> None:
        """Add one batch's drift counts ({"features": [d, b + 2], "score": [1, b + 2], "pca": [1, b + 2]})."""
        key = (model, version)
        total = self._drift.get(key)
        if total is None:
            self._drift[key] = {**{k: v.copy() for k, v in counts.items()}, "rows": rows}
            return
        total["rows"] += rows
        for name, arr in counts.items():
            mine = total.get(name)
            if mine is None or mine.shape != arr.shape:
                total[name] = arr.copy()
            else:
                mine += arr

    def violations(self, model: str, counts: dict[tuple[str, str], int]) -> None:
        """Add input-contract violations {(feature, rule): rows} of one batch."""
        for (feature, rule), n in counts.items():
            key = (model, feature, rule)
            self._violations[key] = self._violations.get(key, 0) + n

    def feedback(self, model: str, labels: int, duplicates: int) -> None:
        entry = self._feedback.setdefault(model, {"labels": 0, "duplicates": 0})
        entry["labels"] += labels
        entry["duplicates"] += duplicates

    def cache(self, model: str, version: str, hits: int, misses: int, hit_ns: int, miss_ns: int) -> None:
        """Add response-cache lookups of a model version: hits, misses and the ns each kind took."""
        s = self._get(model, version)
        s.cache_hits += hits
        s.cache_misses += misses
        s.cache_hit_ns += hit_ns
        s.cache_miss_ns += miss_ns

    def track_cache(self, cache) -> None:
        """Pull `cache.take_counts()` (a `serving.cache.ResponseCache`; None: stop) at every take and
        take_monitoring: its lookups go out with the request statistics, its entries, bytes and
        evictions with the monitoring deltas. The one call a service with a cache makes."""
        self._cache = cache

    def cache_counts(self, counts: dict) -> None:
        """Add one `ResponseCache.take_counts()`: lookups per model version, evictions and answers too big
        to store since the last one (deltas), entries, bytes and capacity now (gauges)."""
        for (model, version), (hits, misses, hit_ns, miss_ns) in counts["models"].items():
            self.cache(model, version, hits, misses, hit_ns, miss_ns)
        before = self._cache_state or {}
        self._cache_state = {
            "entries": counts["entries"], "bytes": counts["bytes"], "capacity_bytes": counts["capacity_bytes"],
            "evictions": before.get("evictions", 0) + counts["evictions"],
            "oversize": before.get("oversize", 0) + counts["oversize"],
        }

    def _pull_cache(self) -> None:
        if self._cache is not None:
            self.cache_counts(self._cache.take_counts())

    def take_monitoring(self) -> dict:
        """The monitoring deltas since the last call: {"drift", "violations", "feedback"} (plain lists and ints),
        and "cache" ({"entries", "bytes", "capacity_bytes", "evictions", "oversize"}) with a response cache."""
        self._pull_cache()
        drift, self._drift = self._drift, {}
        violations, self._violations = self._violations, {}
        feedback, self._feedback = self._feedback, {}
        out = {
            "drift": {key: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in entry.items()}
                      for key, entry in drift.items()},
            "violations": violations,
            "feedback": feedback,
        }
        if self._cache_state is not None:
            out["cache"], self._cache_state = self._cache_state, None
        return out

    def give_back_monitoring(self, delta: dict) -> None:
        """Return monitoring deltas that could not be handed off; they go out with the next ones."""
        import numpy as np

        for (model, version), entry in delta.get("drift", {}).items():
            self.drift(model, version, {k: np.asarray(v, np.int64) for k, v in entry.items() if k != "rows"},
                       entry["rows"])
        for (model, feature, rule), n in delta.get("violations", {}).items():
            self.violations(model, {(feature, rule): n})
        for model, entry in delta.get("feedback", {}).items():
            self.feedback(model, entry["labels"], entry["duplicates"])
        cache = delta.get("cache")
        if cache is not None:  # its counts go out again; gauges read since then are newer than its own
            newer = self._cache_state
            self._cache_state = dict(cache) if newer is None else {
                **newer, "evictions": newer["evictions"] + cache["evictions"],
                "oversize": newer["oversize"] + cache["oversize"]}

    def give_back(self, delta: dict[tuple[str, str], ModelStats]) -> None:
        """Return a delta that could not be handed off; it goes out with the next one."""
        merge_stats(self._stats, delta)

    def take(self) -> dict[tuple[str, str], ModelStats]:
        """Everything recorded since the last call, and start afresh."""
        self._pull_cache()
        features, self._features = self._features, {}
        for (model, version), counts in features.items():
            self._get(model, version).add_feature_counts(counts.tolist())
        out, self._stats = self._stats, {}
        return out
