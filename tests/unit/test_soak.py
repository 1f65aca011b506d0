"""The soak scenarios' figures (benchmarks/soak.py) from made-up request records."""

from __future__ import annotations

import numpy as np

from benchmarks.soak import failure_rate, recovery_s


def _records(sent: np.ndarray, latency: np.ndarray, status: np.ndarray | None = None) -> np.ndarray:
    status = np.full_like(sent, 200) if status is None else status
    zeros = np.zeros_like(sent)
    return np.stack([zeros, sent, status, latency, zeros, zeros], axis=1)


def test_recovery_is_the_end_of_the_last_window_short_of_the_offered_load():
    sent = np.sort(np.random.default_rng(0).uniform(0, 30, 9000))
    stalled = (sent > 10) & (sent < 13)  # everything sent in the outage is answered at 13 s
    records = _records(sent, np.where(stalled, 13 - sent + 0.01, 0.005))
    assert recovery_s(records, 10.0, 30.0) == 3.0
    assert recovery_s(_records(sent, np.full_like(sent, 0.005)), 10.0, 30.0) == 0.0


def test_no_recovery_when_the_answers_never_come_back():
    sent = np.sort(np.random.default_rng(1).uniform(0, 30, 9000))
    status = np.where(sent > 10, 503, 200)
    assert recovery_s(_records(sent, np.full_like(sent, 0.005), status), 10.0, 30.0) is None


def test_failure_rate_counts_non_2xx_and_transport_errors():
    records = _records(np.arange(1000.0), np.full(1000, 0.01), np.where(np.arange(1000) < 3, 503, 200))
    records[10, 4] = 1  # a connect error
    assert abs(failure_rate(records) - 0.004) < 1e-12
    assert failure_rate(np.zeros((0, 6))) == 0.0
