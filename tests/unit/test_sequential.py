"""The anytime-valid allocation tests: the likelihood ratio, calibration under H0 at every tick
(many seeded runs side by side as streams), power, share validation, exact JSON resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from serving.rollout.sequential import AllocationTest, PairedTest, default_grid

RUNS = 2000
TICKS = 300
COARSE = 24  # grid points in the calibration runs: validity holds for any grid, and 24 keep them fast


def _slack(alpha: float, runs: int) -> float:
    return 3.0 * math.sqrt(alpha * (1 - alpha) / runs)  # three binomial standard errors


def _simulate(test: AllocationTest, rng, *, ticks: int, rate_c: float, rate_s: float, weight, requests: int = 40):
    """Per run and tick: requests routed to the candidate with probability `weight`, events per request at each
    arm's rate; the share is the realised one. Returns the tick of each run's first crossing (-1: none)."""
    runs = test.streams
    first = np.full(runs, -1)
    for t in range(ticks):
        n = rng.poisson(requests, runs)
        nc = rng.binomial(n, weight)
        kc, ks = rng.binomial(nc, rate_c), rng.binomial(n - nc, rate_s)
        share = np.divide(nc, n, out=np.zeros(runs), where=n > 0)
        test.update(kc, ks, share)
        crossed = (first < 0) & (test.stream_log_mixtures() >= test.threshold)
        first[crossed] = t
    return first


@pytest.mark.parametrize("side", ["greater", "two-sided"])
def test_false_rejections_stay_under_alpha_at_any_tick(side):
    alpha = 0.05
    rng = np.random.default_rng(11)
    weight = rng.uniform(0.01, 0.5, RUNS)  # each run its own candidate weight
    test = AllocationTest(alpha, side, default_grid(side, points=COARSE), streams=RUNS)
    first = _simulate(test, rng, ticks=TICKS, rate_c=0.1, rate_s=0.1, weight=weight)
    assert (first >= 0).mean() <= alpha + _slack(alpha, RUNS)


def test_a_worse_candidate_is_rejected_and_a_better_one_only_two_sided():
    rng = np.random.default_rng(12)
    worse = _simulate(AllocationTest(0.001, "greater", streams=200), rng, ticks=200, rate_c=0.1, rate_s=0.02,
                      weight=0.1)
    assert (worse >= 0).all()
    better_one = _simulate(AllocationTest(0.001, "greater", streams=200), rng, ticks=200, rate_c=0.005,
                           rate_s=0.05, weight=0.1)
    better_two = _simulate(AllocationTest(0.001, "two-sided", streams=200), rng, ticks=200, rate_c=0.005,
                           rate_s=0.05, weight=0.1)
    assert (better_one < 0).all() and (better_two >= 0).all()


def test_the_average_over_bins_is_calibrated_with_the_realised_share():
    """The outputs gate: per-bin tests averaged, share = candidate outputs / all outputs of the tick
    (so the bins' candidate counts are dependent): still at most alpha false rejections."""
    alpha, runs, bins = 0.05, 400, 6
    probs = np.array([0.6, 0.2, 0.1, 0.06, 0.03, 0.01])
    rng = np.random.default_rng(13)
    test = AllocationTest(alpha, "two-sided", default_grid("two-sided", points=COARSE), streams=runs * bins)
    ever = np.zeros(runs, bool)
    for _ in range(TICKS):
        n = rng.poisson(150, runs)
        nc = rng.binomial(n, 0.2)
        ns = n - nc
        hc, hs = rng.multinomial(nc, probs), rng.multinomial(ns, probs)
        share = np.divide(nc, nc + ns, out=np.zeros(runs), where=nc + ns > 0)
        test.update(hc.reshape(-1), hs.reshape(-1), np.repeat(share, bins))
        per = test.stream_log_mixtures().reshape(runs, bins)
        mean = np.log(np.exp(per - per.max(1, keepdims=True)).mean(1)) + per.max(1)
        ever |= mean >= test.threshold
    assert ever.mean() <= alpha + _slack(alpha, runs)


def test_log_mixture_is_the_exact_likelihood_ratio():
    test = AllocationTest(0.01, "greater", grid=[2.0, 8.0], weights=[1, 3])
    ticks = [(3, 10, 0.1), (0, 5, 0.2), (4, 1, 0.05)]
    log_lr = np.zeros(2)
    for kc, ks, p in ticks:
        test.update(kc, ks, p)
        log_lr += [kc * math.log(t) - (kc + ks) * math.log(t * p + 1 - p) for t in (2.0, 8.0)]
    expected = math.log(0.25 * math.exp(log_lr[0]) + 0.75 * math.exp(log_lr[1]))
    assert test.log_mixture == pytest.approx(expected, rel=1e-12)
    assert test.threshold == pytest.approx(math.log(100))
    assert test.k_candidate[0] == 7 and test.k_stable[0] == 16


def test_multistream_log_mixture_is_the_log_average_of_the_streams():
    test = AllocationTest(0.01, "two-sided", streams=3)
    test.update([5, 0, 2], [1, 9, 2], 0.3)
    per = test.stream_log_mixtures()
    assert test.log_mixture == pytest.approx(math.log(np.exp(per).mean()), rel=1e-12)
    assert test.leading_stream == int(np.argmax(per))


def test_shares_of_zero_or_one_and_empty_ticks_change_nothing():
    test = AllocationTest(0.01)
    test.update(3, 4, 0.0)
    test.update(3, 4, 1.0)
    test.update(0, 0, 0.3)
    assert test.ticks == 0 and test.log_mixture == 0.0 and test.k_candidate[0] == 0


@pytest.mark.parametrize("share", [1.5, -0.1, float("nan")])
def test_a_share_outside_0_1_is_refused_naming_it(share):
    with pytest.raises(ValueError, match=str(share).replace(".", r"\.")):
        AllocationTest(0.01).update(1, 1, share)


def test_bad_counts_and_settings_are_refused():
    with pytest.raises(ValueError, match="-1"):
        AllocationTest(0.01).update(-1, 2, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        AllocationTest(1.5)
    with pytest.raises(ValueError, match="side"):
        AllocationTest(0.01, "up")
    with pytest.raises(ValueError, match="greater"):
        AllocationTest(0.01, "greater", grid=[0.5, 2.0])


def test_json_round_trip_resumes_exactly():
    rng = np.random.default_rng(14)
    test = AllocationTest(0.001, "two-sided", streams=3)
    for _ in range(40):
        test.update(rng.poisson([1, 2, 3]), rng.poisson([20, 30, 40]), rng.uniform(0.02, 0.2))
    copy = AllocationTest.from_dict(json.loads(json.dumps(test.to_dict())))
    assert np.array_equal(copy.log_lr, test.log_lr) and copy.log_mixture == test.log_mixture
    for _ in range(200):  # a regression from here on: both decide at the same tick with the same evidence
        kc, ks, p = rng.poisson([6, 2, 3]), rng.poisson([20, 30, 40]), rng.uniform(0.02, 0.2)
        assert test.update(kc, ks, p) == copy.update(kc, ks, p)
        assert test.log_mixture == copy.log_mixture
    assert test.rejected and copy.to_dict() == test.to_dict()


def test_paired_sign_test_is_the_allocation_test_at_one_half_and_calibrated():
    paired = PairedTest(0.05)
    same = AllocationTest(0.05, "greater", paired.test.grid, weights=paired.test.weights)
    rng = np.random.default_rng(15)
    for _ in range(50):
        b, c = rng.poisson(2), rng.poisson(2)
        paired.update(b, c, pairs=b + c + 30)
        same.update(b, c, 0.5)
    assert paired.log_mixture == same.log_mixture
    assert paired.accuracy_delta == pytest.approx((paired.candidate_only_right - paired.stable_only_right)
                                                  / paired.pairs)
    # calibration: discordant pairs split evenly, many runs side by side
    runs = AllocationTest(0.05, "greater", paired.test.grid, streams=RUNS // 2, weights=paired.test.weights)
    ever = np.zeros(RUNS // 2, bool)
    for _ in range(TICKS):
        d = rng.binomial(10, 0.06, RUNS // 2)
        b = rng.binomial(d, 0.5)
        runs.update(b, d - b, 0.5)
        ever |= runs.stream_log_mixtures() >= runs.threshold
    assert ever.mean() <= 0.05 + _slack(0.05, RUNS // 2)


def test_paired_test_rejects_a_three_point_accuracy_drop_and_resumes_from_json():
    rng = np.random.default_rng(16)
    test = PairedTest(0.00025)
    pairs = 0
    while not test.rejected and pairs < 20_000:  # 6 % discordant: b 4.5 %, c 1.5 %
        b, c, _ = rng.multinomial(10, [0.045, 0.015, 0.94])
        test.update(b, c, 10)
        pairs += 10
        if pairs == 500:
            test = PairedTest.from_dict(json.loads(json.dumps(test.to_dict())))
    assert test.rejected and pairs <= 5_000
    assert test.accuracy_delta < 0 and test.estimate > 1
    with pytest.raises(ValueError, match="pairs"):
        test.update(3, 2, pairs=4)


def test_default_grids():
    up = default_grid("greater")
    assert up[0] == pytest.approx(1.05) and up[-1] == pytest.approx(1000.0)
    both = default_grid("two-sided")
    assert (both < 1).sum() == (both > 1).sum() == up.size
    assert AllocationTest(0.01, "less").grid.max() < 1
