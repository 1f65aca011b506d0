"""What a rollout reports per arm beyond the judge: totals per version, shadow pair comparisons, and
the sample-ratio-mismatch test of an A/B experiment.

`ArmTotals` accumulates the replicas' evidence for the status report (requests, errors, latency
quantiles from the histograms). `ShadowTotals` sums the shadow comparisons (pairs, decisions that
differ, the largest absolute difference, the mean score delta, copies shed) and turns one push's
pairs into the judge's two sides: each pair is one request on each side (share 1/2), the stable
and candidate answers' score histograms and which side failed; latency is left out (a copy runs
after the answer, not beside it). `SampleRatio` is an anytime-valid two-sided test that the
candidate's share of an A/B experiment's requests is the configured split: a mismatch means the
routing or a side's failures bias the arms, and the comparison cannot be trusted.
"""

from __future__ import annotations

import numpy as np

from serving.rollout.judge import LATENCY_EDGES_S
from serving.rollout.sequential import AllocationTest

__all__ = ["ArmTotals", "ShadowTotals", "SampleRatio"]


class ArmTotals:
    def __init__(self):
        self.arms: dict[str, dict] = {}

    def add(self, version: str, counts: dict) -> None:
        arm = self.arms.setdefault(version, {"requests": 0, "errors": 0,
                                             "latency": np.zeros(len(LATENCY_EDGES_S) + 1, np.int64)})
        arm["requests"] += int(counts.get("requests", 0))
        arm["errors"] += int(counts.get("errors", 0))
        if counts.get("latency"):
            arm["latency"] += np.asarray(counts["latency"], np.int64)

    def report(self) -> dict:
        out = {}
        for version, arm in self.arms.items():
            hist = arm["latency"]
            total = int(hist.sum())
            quantiles = {}
            if total:
                cdf = np.cumsum(hist) / total
                edges = np.asarray((*LATENCY_EDGES_S, float("inf")))
                quantiles = {f"p{int(q * 100)}_ms": round(float(edges[np.searchsorted(cdf, q)]) * 1000, 3)
                             for q in (0.5, 0.95, 0.99)}
            out[version] = {"requests": arm["requests"], "errors": arm["errors"],
                            "error_rate": arm["errors"] / arm["requests"] if arm["requests"] else None,
                            "latency_upper_bound": quantiles}
        return out


class ShadowTotals:
    def __init__(self):
        self.pairs = self.rows = self.disagree = self.shed = 0
        self.candidate_only_failed = self.stable_only_failed = self.both_failed = 0
        self.max_abs_diff = 0.0
        self.score_delta_sum = 0.0

    def add(self, pairs: dict) -> tuple[dict, dict]:
        """Sum one push's pairs; return them as the judge's (stable, candidate) sides."""
        for key in ("pairs", "rows", "disagree", "shed", "candidate_only_failed", "stable_only_failed",
                    "both_failed"):
            setattr(self, key, getattr(self, key) + int(pairs.get(key, 0)))
        self.max_abs_diff = max(self.max_abs_diff, float(pairs.get("max_abs_diff", 0.0)))
        self.score_delta_sum += float(pairs.get("score_delta_sum", 0.0))
        n = int(pairs.get("pairs", 0))
        stable = {"requests": n, "errors": int(pairs.get("stable_only_failed", 0)) + int(pairs.get("both_failed", 0))}
        candidate = {"requests": n,
                     "errors": int(pairs.get("candidate_only_failed", 0)) + int(pairs.get("both_failed", 0))}
        if pairs.get("stable_scores") and pairs.get("candidate_scores"):
            stable["scores"], candidate["scores"] = pairs["stable_scores"], pairs["candidate_scores"]
        return stable, candidate

    def report(self) -> dict:
        return {"pairs": self.pairs, "rows": self.rows, "decisions_differ": self.disagree,
                "disagreement_rate": self.disagree / self.rows if self.rows else None,
                "max_abs_diff": self.max_abs_diff,
                "mean_score_delta": self.score_delta_sum / self.rows if self.rows else None,
                "candidate_only_failed": self.candidate_only_failed, "stable_only_failed": self.stable_only_failed,
                "both_failed": self.both_failed, "shed": self.shed}


class SampleRatio:
    """Is the candidate's share of requests the split? (two-sided, anytime-valid, false alarm `alpha`)."""

    def __init__(self, split: float, alpha: float = 0.001):
        self.split = split
        self.test = AllocationTest(alpha, side="two-sided")

    def add(self, candidate_requests: int, stable_requests: int) -> bool:
        """Count one push; True when the mismatch is established (from then on)."""
        if candidate_requests or stable_requests:
            self.test.update(candidate_requests, stable_requests, self.split)
        return self.test.rejected

    def report(self) -> dict:
        k_c, k_s = float(self.test.k_candidate.sum()), float(self.test.k_stable.sum())
        return {"split": self.split, "observed": k_c / (k_c + k_s) if k_c + k_s else None,
                "log_e_value": round(float(self.test.log_mixture), 3), "threshold": round(self.test.threshold, 3),
                "mismatch": bool(self.test.rejected)}
