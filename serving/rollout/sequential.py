"""Anytime-valid tests for a canary: where do events land, candidate or stable?

The primitive is the *allocation* of events between two arms that share a stream of traffic.
Under H0 (the candidate behaves like stable) and routing that does not look at the outcome, an
event of a tick (a failed request, a request slower than a threshold, an output in a given bin)
lands in the candidate with probability p_t, the candidate's share of the population the event
is drawn from in that tick (candidate requests / all requests). If the candidate's event rate is
theta times stable's, the tick's likelihood ratio against H0 is

    theta^{k_c} / (theta p_t + 1 - p_t)^{k_c + k_s}

for k_c candidate and k_s stable events. Its product over ticks, mixed over a grid of theta with
prior weights, is a nonnegative supermartingale under H0 that starts at 1, so by Ville's
inequality it ever reaches 1/alpha with probability at most alpha: the test may be read after
every tick, forever, and stopped at any moment (Lindon, Sanden and Shirikian, KDD 2022; Lindon
and Malek, "Anytime-valid inference for multinomial count data").

Why a supermartingale when p_t is the *realised* share of the tick: given the tick's candidate
and stable population sizes and its total events, the candidate's events are hypergeometric,
and for the convex function k -> theta^k a hypergeometric mean is at most the binomial one
(Hoeffding 1963), which is exactly the denominator. So no knowledge of the configured weight is
needed, and counts from replicas that route slightly off the weight stay valid.

`AllocationTest` keeps the cumulative log likelihood ratio on the grid (O(grid) per tick, no
per-event loop). With `streams > 1` it holds several such tests side by side (several
thresholds, several output bins, or many simulated runs); `log_mixture` is then the log of
their *average*, a mixture over "which stream moved", itself a test supermartingale and never
less powerful than a Bonferroni over the streams. `PairedTest` is the sign test over discordant
shadow pairs, the same arithmetic at p = 1/2. Both serialise to JSON-able dicts that resume
exactly (floats round-trip through JSON bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["AllocationTest", "PairedTest", "default_grid", "SIDES"]

SIDES = ("greater", "less", "two-sided")


def default_grid(side: str = "greater", low: float = 1.05, high: float = 1000.0, points: int = 120) -> np.ndarray:
    """Rate ratios theta (candidate / stable) the mixture covers: `points` log-spaced from `low`
    to `high` for "greater" (candidate worse = more events), their reciprocals for "less", both
    for "two-sided". 120 points over ln(1000/1.05) = 6.9 put neighbours 6 % apart, which costs
    under 0.2 nats of evidence against the best theta even with thousands of events."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if not (1.0 < low < high) or points < 1:
        raise ValueError(f"need 1 < low < high and points >= 1, got low={low}, high={high}, points={points}")
    up = np.geomspace(low, high, points)
    if side == "greater":
        return up
    if side == "less":
        return 1.0 / up[::-1]
    return np.concatenate([1.0 / up[::-1], up])


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _counts(value, streams: int, name: str) -> np.ndarray:
    if np.ndim(value) == 0:
        v = float(value)
        if not 0.0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite count >= 0, got {value!r}")
        return np.full(streams, v)
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (streams,):
        raise ValueError(f"{name} must be a count or {streams} counts, got shape {arr.shape}")
    if not (np.isfinite(arr).all() and arr.min() >= 0):
        raise ValueError(f"{name} must be finite counts >= 0, got {value!r}")
    return arr


class AllocationTest:
    """Sequential test of "candidate events at theta x stable's rate" against theta = 1.

    alpha: the false-rejection probability over the whole life of the test (any stopping time).
    side: "greater" (candidate worse: more events), "less", or "two-sided".
    grid: the thetas mixed over (default `default_grid(side)`); weights: their prior (default
    equal, which on the log-spaced default grid is uniform on log theta, each side half for
    "two-sided"). streams: independent tests kept side
    by side; counts and shares are then arrays of that length and the decision uses their
    average (see the module docstring).
    """

    def __init__(self, alpha: float, side: str = "greater", grid=None, *, streams: int = 1, weights=None):
        if not (0.0 < float(alpha) < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if int(streams) < 1:
            raise ValueError(f"streams must be >= 1, got {streams!r}")
        theta = default_grid(side) if grid is None else np.asarray(grid, dtype=np.float64).reshape(-1)
        if theta.size == 0 or not np.all(np.isfinite(theta)) or np.any(theta <= 0) or np.any(theta == 1.0):
            raise ValueError("grid must be finite rate ratios > 0 other than 1")
        if side == "greater" and np.any(theta < 1) or side == "less" and np.any(theta > 1):
            raise ValueError(f"a {side!r} test needs every grid point on that side of 1")
        w = np.ones(theta.size) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != theta.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {theta.size} finite values >= 0 with a positive sum")
        self.alpha = float(alpha)
        self.side = side
        self.streams = int(streams)
        self.grid = theta
        self._log_theta = np.log(theta)
        self._theta_m1 = theta - 1.0
        self._set_weights(w / w.sum())
        self.log_lr = np.zeros((self.streams, theta.size))
        self.k_candidate = np.zeros(self.streams)
        self.k_stable = np.zeros(self.streams)
        self.expected_candidate = np.zeros(self.streams)  # sum of p_t * events: candidate events expected under H0
        self.expected_stable = np.zeros(self.streams)
        self.ticks = 0
        self.rejected = False
        self._refresh()

    def _set_weights(self, w: np.ndarray) -> None:
        self._weights = w
        with np.errstate(divide="ignore"):
            self._log_w = np.log(w)

    @property
    def weights(self) -> np.ndarray:
        """The prior weight of each grid point (sum 1)."""
        return self._weights

    @property
    def threshold(self) -> float:
        """ln(1/alpha): the test rejects once `log_mixture` reaches it (Ville's inequality)."""
        return math.log(1.0 / self.alpha)

    def update(self, k_candidate, k_stable, share) -> bool:
        """One tick: events in each arm and the candidate's share of the tick's population.

        A share of 0 or 1, or no events, changes nothing; other shares must lie in (0, 1).
        Returns `rejected` (which stays True once set: the first crossing is the decision).
        """
        kc = _counts(k_candidate, self.streams, "k_candidate")
        ks = _counts(k_stable, self.streams, "k_stable")
        if np.ndim(share) == 0:
            p = float(share)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"share must be in [0, 1] (the candidate's share of the tick), got {share!r}")
            if p == 0.0 or p == 1.0:
                return self.rejected
            log_norm = np.log1p(p * self._theta_m1)[None, :]
        else:
            p = np.asarray(share, dtype=np.float64)
            if p.shape != (self.streams,):
                raise ValueError(f"share must be a number or {self.streams} numbers, got shape {p.shape}")
            if not ((p >= 0) & (p <= 1)).all():
                raise ValueError(f"share must be in [0, 1] (the candidate's share of the tick), got {share!r}")
            log_norm = np.log1p(p[:, None] * self._theta_m1[None, :])
        n = kc + ks
        live = (n > 0) & (p > 0) & (p < 1)
        if not live.any():
            return self.rejected
        self.ticks += 1
        step = kc[:, None] * self._log_theta[None, :] - n[:, None] * log_norm
        if live.all():
            self.log_lr += step
        else:
            self.log_lr[live] += step[live]
            n, kc, ks = np.where(live, n, 0.0), np.where(live, kc, 0.0), np.where(live, ks, 0.0)
        self.k_candidate += kc
        self.k_stable += ks
        self.expected_candidate += p * n
        self.expected_stable += (1.0 - p) * n
        self._refresh()
        if not self.rejected and self._log_mixture >= self.threshold:
            self.rejected = True
        return self.rejected

    def _refresh(self) -> None:
        """Recompute the cached e-values (after the log likelihood ratios changed)."""
        self._stream_lm = _logsumexp(self.log_lr + self._log_w[None, :], axis=1)
        self._log_mixture = float(self._stream_lm[0]) if self.streams == 1 else float(
            _logsumexp(self._stream_lm) - math.log(self.streams))

    def stream_log_mixtures(self) -> np.ndarray:
        """Each stream's own log mixture (log of its e-value), shape (streams,)."""
        return self._stream_lm.copy()

    @property
    def log_mixture(self) -> float:
        """log of the test's e-value: the mixture over the grid, averaged over the streams."""
        return self._log_mixture

    def estimates(self) -> np.ndarray:
        """Per stream, the rate ratio as observed / expected events in each arm, with 0.5 added to every count so
        it stays finite (the MLE of theta when the share is constant, up to that 0.5)."""
        return ((self.k_candidate + 0.5) / (self.expected_candidate + 0.5)) / (
            (self.k_stable + 0.5) / (self.expected_stable + 0.5))

    @property
    def leading_stream(self) -> int:
        """The stream with the largest e-value (the one that moved most)."""
        return int(np.argmax(self._stream_lm))

    @property
    def estimate(self) -> float:
        """The rate ratio of the leading stream (see `estimates`)."""
        return float(self.estimates()[self.leading_stream])

    def to_dict(self) -> dict:
        """JSON-able state; `from_dict` resumes it exactly."""
        return {"alpha": self.alpha, "side": self.side, "streams": self.streams, "grid": self.grid.tolist(),
                "weights": self._weights.tolist(), "log_lr": self.log_lr.tolist(),
                "k_candidate": self.k_candidate.tolist(), "k_stable": self.k_stable.tolist(),
                "expected_candidate": self.expected_candidate.tolist(),
                "expected_stable": self.expected_stable.tolist(), "ticks": self.ticks, "rejected": self.rejected}

    @classmethod
    def from_dict(cls, doc: dict) -> AllocationTest:
        try:
            test = cls(doc["alpha"], doc["side"], doc["grid"], streams=doc["streams"], weights=doc["weights"])
            log_lr = np.asarray(doc["log_lr"], dtype=np.float64)
            if log_lr.shape != test.log_lr.shape:
                raise ValueError(f"log_lr has shape {log_lr.shape}, expected {test.log_lr.shape}")
            test.log_lr = log_lr
            for key in ("k_candidate", "k_stable", "expected_candidate", "expected_stable"):
                setattr(test, key, _counts(doc[key], test.streams, key))
            test.ticks = int(doc["ticks"])
            test.rejected = bool(doc["rejected"])
        except KeyError as exc:
            raise ValueError(f"an AllocationTest state needs the key {exc.args[0]!r}") from exc
        test._set_weights(np.asarray(doc["weights"], dtype=np.float64))  # as saved, not renormalised: bit-exact
        test._refresh()
        return test


def _uniform_pi_weights(theta: np.ndarray) -> np.ndarray:
    """Prior weights on grid points for a uniform prior on pi = theta / (1 + theta) over (1/2, 1):
    each point gets the pi-mass of its cell (cell edges at the geometric midpoints)."""
    edges = np.sqrt(theta[1:] * theta[:-1])
    cuts = np.concatenate([[0.5], edges / (1.0 + edges), [1.0]])  # pi at the cell edges, theta = 1 .. inf
    return np.diff(cuts)


class PairedTest:
    """One-sided sequential sign test on shadow pairs: is the candidate less accurate than stable?

    A labelled pair is discordant when exactly one version was right: b = only stable right,
    c = only candidate right. Under H0 (equal accuracy, pairs exchangeable) each discordant pair
    is b with probability 1/2; the likelihood ratio for b/c rate ratio theta is
    theta^b / ((theta + 1) / 2)^(b + c), an `AllocationTest` at share 1/2. The prior is uniform on
    pi = P(b | discordant) over (1/2, 1) (the Beta(1, 1) of a Bayes-factor sign test, cut to the
    alternative), placed on the default grid.
    """

    def __init__(self, alpha: float, grid=None, weights=None):
        theta = default_grid("greater") if grid is None else np.asarray(grid, dtype=np.float64)
        w = _uniform_pi_weights(theta) if weights is None else weights
        self.test = AllocationTest(alpha, "greater", theta, weights=w)
        self.pairs = 0

    @property
    def alpha(self) -> float:
        return self.test.alpha

    @property
    def threshold(self) -> float:
        return self.test.threshold

    @property
    def rejected(self) -> bool:
        return self.test.rejected

    @property
    def log_mixture(self) -> float:
        return self.test.log_mixture

    @property
    def stable_only_right(self) -> int:
        return int(self.test.k_candidate[0])

    @property
    def candidate_only_right(self) -> int:
        return int(self.test.k_stable[0])

    def update(self, stable_only_right: int, candidate_only_right: int, pairs: int = 0) -> bool:
        """One tick's labelled pairs: discordant counts (and, for the estimate, all pairs)."""
        if pairs < 0 or (pairs and pairs < stable_only_right + candidate_only_right):
            raise ValueError(f"pairs must be >= 0 and hold the discordant ones, got pairs={pairs}, "
                             f"stable_only_right={stable_only_right}, candidate_only_right={candidate_only_right}")
        self.pairs += int(pairs)
        return self.test.update(stable_only_right, candidate_only_right, 0.5)

    @property
    def estimate(self) -> float:
        """b / c, the ratio of "only stable right" to "only candidate right" (0.5 added to each)."""
        return (self.stable_only_right + 0.5) / (self.candidate_only_right + 0.5)

    @property
    def accuracy_delta(self) -> float | None:
        """Candidate accuracy minus stable's over the pairs counted, (c - b) / pairs; None without pairs."""
        return (self.candidate_only_right - self.stable_only_right) / self.pairs if self.pairs else None

    def to_dict(self) -> dict:
        return {"test": self.test.to_dict(), "pairs": self.pairs}

    @classmethod
    def from_dict(cls, doc: dict) -> PairedTest:
        try:
            test = AllocationTest.from_dict(doc["test"])
            out = cls(test.alpha, test.grid, test.weights)
            out.test, out.pairs = test, int(doc["pairs"])
        except KeyError as exc:
            raise ValueError(f"a PairedTest state needs the key {exc.args[0]!r}") from exc
        return out
