"""The ranking detector: silent while a binary classifier ranks as it did, an alarm once positives stop scoring
above negatives (what a concept shift does to a model of a rare class, its 0.5-threshold error rate unchanged)."""

from __future__ import annotations

import numpy as np

from serving.monitoring.reference import histogram_reference
from serving.monitoring.rank import RankDetector


def draw(rng, n: int, collapsed: bool = False, rate: float = 0.01):
    y = (rng.random(n) < rate).astype(np.int64)
    negatives = rng.beta(1, 50, n)
    positives = rng.beta(1, 50, n) if collapsed else rng.beta(5, 3, n)
    return np.where(y == 1, positives, negatives), y


def reference(rng) -> dict:
    s, y = draw(rng, 8000)  # a holdout of 8,000 rows: about 80 positives
    return {str(c): histogram_reference(s[y == c]) for c in (0, 1)}


def test_stable_ranking_stays_silent_and_a_collapse_is_flagged_quickly():
    rng = np.random.default_rng(0)
    by_label = reference(rng)
    detector = RankDetector(by_label)
    for k in range(2000):  # 2 M stable labels
        assert detector.add(*draw(rng, 1000), k) == []
    delays = []
    for trial in range(20):
        detector = RankDetector(by_label)
        for k in range(20):
            detector.add(*draw(rng, 1000), k)
        labels, events = 0, []
        while not events and labels < 20_000:
            events = detector.add(*draw(rng, 100, collapsed=True), trial)
            labels += 100
        assert events and events[0]["state"] == "alarm" and events[0]["evidence"]["which"] == "positives lower"
        delays.append(labels)
    assert max(delays) <= 8000, delays
    assert detector.report(0.0)["state"] == "alarm"
    assert detector.retire(1.0, "replaced")[0]["state"] == "ok"


def test_the_error_rate_at_the_threshold_barely_moves_where_the_ranking_collapses():
    """Why the detector exists: with 1 % positives, errors at 0.5 are about the same before and after."""
    rng = np.random.default_rng(1)
    s, y = draw(rng, 200_000)
    s2, y2 = draw(rng, 200_000, collapsed=True)
    before, after = np.mean((s >= 0.5) != (y == 1)), np.mean((s2 >= 0.5) != (y2 == 1))
    assert abs(after - before) < 0.01 and before < 0.01
