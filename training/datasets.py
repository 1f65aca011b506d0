"""Seeded datasets for the example models: synthetic fraud transactions and scikit-learn's digits.

`make_fraud` draws card transactions with 30 numeric features and a ~1% fraud
label. The label follows a fixed nonlinear rule of the features plus noise, so
a small MLP reaches a holdout ROC AUC well above 0.9 but never 1.0. The rule
and the feature-mixing matrix come from fixed seeds (not the data seed), so
every data seed draws from the same world; the data seed only picks the rows.

Scenarios, for drift and rollout experiments:
- "baseline": the training distribution.
- "covariate_shift": amount, hour, merchant risk, distance and several
  anonymised components move (means and scales); the label rule is unchanged.
- "concept_shift": the same features as "baseline" (the same seed gives the
  very same X), labelled by a different rule.
- "correlation_shift": every feature's marginal distribution is unchanged but
  one correlation goes: txn_count_24h is Poisson(0.6) drawn independently
  plus Poisson(4), the same Poisson(4.6) marginal no longer tied to
  txn_count_1h (correlation 0.36 -> 0). No per-feature histogram can see it;
  a PCA reconstruction error does (its PSI against the baseline is ~0.03: a
  subtle change on purpose). The label rule is unchanged.

`load_digits` splits scikit-learn's bundled 8 x 8 handwritten digits (1,797
images, shipped inside sklearn: no download) into seeded train and holdout sets,
as the uint8 images a client of the `digits` model sends.

CLI: `python -m training.datasets fraud --rows N --scenario S --out DIR` and
`python -m training.datasets digits --out DIR` (parquet: "image" as 8 x 8 uint8
lists, "label"; "split" says train or holdout).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FRAUD_FEATURES", "FRAUD_SCENARIOS", "make_fraud", "write_fraud_parquet", "DigitsSplit", "load_digits",
    "write_digits_parquet", "main",
]  # fmt: skip

_N_COMPONENTS = 22
FRAUD_FEATURES: list[str] = [
    "amount",  # transaction amount, currency units (log-normal)
    "hour",  # local hour of day, 0..24 (fractional)
    "merchant_risk",  # merchant's historical fraud score, 0..1
    "distance_km",  # distance from the card holder's home
    "txn_count_1h",  # transactions on the card in the last hour
    "txn_count_24h",  # transactions on the card in the last 24 hours
    "account_age_days",
    "is_foreign",  # 1.0 when the merchant is abroad
] + [f"V{i}" for i in range(1, _N_COMPONENTS + 1)]  # anonymised (PCA-style) components
FRAUD_SCENARIOS = ("baseline", "covariate_shift", "concept_shift", "correlation_shift")

_POSITIVE_RATE = 0.01
_NOISE_STD = 0.45  # label noise relative to the unit-variance rule score; sets the ceiling on AUC
_WORLD_SEED = 7_2024  # the V mixing matrix
_RULE_SEEDS = {"baseline": 11, "concept": 29}  # the random part of each label rule
_CALIBRATION_ROWS = 200_000
_CALIBRATION_SEED = 123_456


@dataclass(frozen=True)
class _Rule:
    """A label rule: weights of hand-made terms plus random tanh projections of the V components."""

    amount: float
    night: float
    merchant: float
    foreign_distance: float
    velocity: float
    young_account: float
    amount_x_night: float
    proj_w: np.ndarray  # (k, 22)
    proj_b: np.ndarray  # (k,)
    proj_c: np.ndarray  # (k,)


@functools.lru_cache(maxsize=None)
def _mixing() -> np.ndarray:
    rng = np.random.default_rng(_WORLD_SEED)
    a = np.eye(_N_COMPONENTS) + 0.35 * rng.standard_normal((_N_COMPONENTS, _N_COMPONENTS)) / np.sqrt(_N_COMPONENTS)
    return a / np.linalg.norm(a, axis=0, keepdims=True)  # unit-variance columns


@functools.lru_cache(maxsize=None)
def _rule(kind: str) -> _Rule:
    rng = np.random.default_rng(_RULE_SEEDS[kind])
    k = 6
    w = rng.standard_normal((k, _N_COMPONENTS)) * (rng.random((k, _N_COMPONENTS)) < 0.25)  # sparse projections
    common = dict(proj_w=w, proj_b=rng.normal(0.0, 0.5, k), proj_c=rng.normal(0.0, 1.0, k))
    if kind == "baseline":
        return _Rule(1.0, 0.9, 1.1, 0.8, 0.7, 0.5, 0.5, **common)
    # Concept shift: small "card testing" amounts, daytime fraud, velocity dominates.
    return _Rule(-0.8, -0.4, 0.6, 0.2, 1.4, 0.9, 0.0, **common)


def _features(rng: np.random.Generator, n: int, scenario: str) -> np.ndarray:
    shifted = scenario == "covariate_shift"
    x = np.empty((n, len(FRAUD_FEATURES)), dtype=np.float64)
    x[:, 0] = rng.lognormal(4.0 if shifted else 3.6, 1.3 if shifted else 1.1, n)
    day = rng.normal(18.0 if shifted else 14.0, 4.5, n) % 24.0
    x[:, 1] = np.where(rng.random(n) < 0.85, day, rng.uniform(0.0, 24.0, n))
    x[:, 2] = rng.beta(3.0, 8.0, n) if shifted else rng.beta(2.0, 10.0, n)
    x[:, 3] = rng.lognormal(2.2 if shifted else 1.5, 1.2, n)
    x[:, 4] = rng.poisson(0.6, n)
    if scenario == "correlation_shift":  # the same Poisson(4.6) marginal, drawn apart from txn_count_1h
        x[:, 5] = rng.poisson(0.6, n) + rng.poisson(4.0, n)
    else:
        x[:, 5] = x[:, 4] + rng.poisson(4.0, n)
    x[:, 6] = rng.gamma(2.0, 300.0, n)
    x[:, 7] = rng.random(n) < (0.12 if shifted else 0.06)
    v = rng.standard_normal((n, _N_COMPONENTS)) @ _mixing()
    if shifted:
        v[:, :6] += 0.8
        v[:, 6:9] *= 1.5
    x[:, 8:] = v
    return x


def _raw_score(x: np.ndarray, rule: _Rule) -> np.ndarray:
    amount = (np.log(x[:, 0]) - 3.6) / 1.1
    night = np.cos(2.0 * np.pi * (x[:, 1] - 3.0) / 24.0)  # +1 at 3 am, -1 at 3 pm
    merchant = (x[:, 2] - 0.17) / 0.1
    foreign_distance = x[:, 7] * np.log1p(x[:, 3])
    velocity = np.sqrt(x[:, 4]) + 0.1 * np.sqrt(x[:, 5])
    young_account = np.exp(-x[:, 6] / 90.0)
    v = x[:, 8:]
    projected = np.tanh(v @ rule.proj_w.T + rule.proj_b) @ rule.proj_c
    return (
        rule.amount * amount
        + rule.night * night
        + rule.merchant * merchant
        + rule.foreign_distance * foreign_distance
        + rule.velocity * velocity
        + rule.young_account * young_account
        + rule.amount_x_night * amount * np.maximum(night, 0.0)
        + projected
        + 0.4 * v[:, 2] * v[:, 6]  # one plain interaction an MLP has to find
    )


@functools.lru_cache(maxsize=None)
def _calibration(kind: str) -> tuple[float, float, float]:
    """(score mean, score std, threshold) that give a ~1% positive rate on baseline features."""
    rng = np.random.default_rng(_CALIBRATION_SEED)
    x = _features(rng, _CALIBRATION_ROWS, "baseline")
    raw = _raw_score(x, _rule(kind))
    mean, std = float(raw.mean()), float(raw.std())
    noisy = (raw - mean) / std + _NOISE_STD * rng.standard_normal(_CALIBRATION_ROWS)
    return mean, std, float(np.quantile(noisy, 1.0 - _POSITIVE_RATE))


def make_fraud(n_rows: int, *, seed: int = 0, scenario: str = "baseline") -> tuple[np.ndarray, np.ndarray]:
    """Draw `n_rows` transactions: X float32 [n, 30] (columns FRAUD_FEATURES) and y int64 [n] (1 = fraud).

    About 1% of baseline rows are fraud. The same (n_rows, seed, scenario) always
    gives identical arrays; "concept_shift" gives the same X as "baseline" for a seed.
    """
    if scenario not in FRAUD_SCENARIOS:
        raise ValueError(f"unknown fraud scenario {scenario!r}; use one of {', '.join(FRAUD_SCENARIOS)}")
    if int(n_rows) < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    n = int(n_rows)
    rng = np.random.default_rng(seed)
    x = _features(rng, n, scenario)
    kind = "concept" if scenario == "concept_shift" else "baseline"
    mean, std, threshold = _calibration(kind)
    score = (_raw_score(x, _rule(kind)) - mean) / std + _NOISE_STD * rng.standard_normal(n)
    return x.astype(np.float32), (score > threshold).astype(np.int64)


def write_fraud_parquet(path: str, n_rows: int, seed: int = 0, scenario: str = "baseline", *, filesystem=None) -> str:
    """Write `make_fraud(n_rows, seed=seed, scenario=scenario)` as parquet (feature columns + "label"); return path.

    `filesystem`: a pyarrow filesystem `path` is in (its folder is not created); None: a local path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = make_fraud(n_rows, seed=seed, scenario=scenario)
    columns = {name: pa.array(x[:, i]) for i, name in enumerate(FRAUD_FEATURES)}
    columns["label"] = pa.array(y)
    table = pa.table(columns).replace_schema_metadata(
        {"fleet.generator": "training.datasets.make_fraud", "fleet.seed": str(seed), "fleet.scenario": scenario}
    )
    if filesystem is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path, filesystem=filesystem)
    return path


@dataclass(frozen=True)
class DigitsSplit:
    """Digits images uint8 [n, 8, 8] (0 = background, 255 = ink) and labels int64 [n] (0..9), train and holdout."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def load_digits(*, seed: int = 0, holdout_fraction: float = 0.2) -> DigitsSplit:
    """scikit-learn's digits as uint8 images, split at random (seeded) into train and holdout.

    The bundled pixels are 0..16; they are scaled to 0..255 (`rint(v * 255 / 16)`)
    so the images look like what a client sends. The same seed gives the same split.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    bunch = _sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    n_holdout = max(1, int(round(len(images) * holdout_fraction)))
    train, holdout = order[:-n_holdout], order[-n_holdout:]
    return DigitsSplit(images[train], labels[train], images[holdout], labels[holdout])


def write_digits_parquet(path: str, seed: int = 0, *, filesystem=None) -> str:
    """Write `load_digits(seed=seed)` as parquet: "image" (list<list<uint8>>, 8 x 8), "label", "split"; return path.

    `filesystem`: a pyarrow filesystem `path` is in (its folder is not created); None: a local path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = load_digits(seed=seed)
    images = np.concatenate([split.x_train, split.x_holdout])
    labels = np.concatenate([split.y_train, split.y_holdout])
    which = ["train"] * len(split.y_train) + ["holdout"] * len(split.y_holdout)
    table = pa.table({"image": pa.array(images.tolist(), type=pa.list_(pa.list_(pa.uint8()))),
                      "label": pa.array(labels), "split": pa.array(which)})
    table = table.replace_schema_metadata({"fleet.source": "sklearn.datasets.load_digits", "fleet.seed": str(seed)})
    if filesystem is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path, filesystem=filesystem)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datasets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    fraud = sub.add_parser("fraud", help="synthetic card transactions (30 features, ~1%% fraud)")
    fraud.add_argument("--rows", type=int, default=100_000)
    fraud.add_argument("--seed", type=int, default=0)
    fraud.add_argument("--scenario", choices=FRAUD_SCENARIOS, default="baseline")
    fraud.add_argument("--out", required=True, help="output folder")
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8 x 8 digits as uint8 images")
    digits.add_argument("--seed", type=int, default=0, help="of the train/holdout split")
    digits.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        path = write_digits_parquet(os.path.join(args.out, f"digits-seed{args.seed}.parquet"), args.seed)
        print(f"wrote the 1,797 digits images (seed {args.seed}) to {path}")
        return 0
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    path = os.path.join(args.out, f"fraud-{args.scenario}-seed{args.seed}-{args.rows}.parquet")
    write_fraud_parquet(path, args.rows, args.seed, args.scenario)
    print(f"wrote {args.rows} rows ({args.scenario}, seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
