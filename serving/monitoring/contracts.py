"""Input contracts: per-feature content rules beyond shape and type, checked per batch by a native kernel.

Declared in a tabular model's config.pbtxt `parameters` (a model that declares `preprocess:
standardize`, whose features are named in its metadata.json `feature_names`):

    fleet.contract.<feature>        "range <lo> <hi>"   (inf / -inf: no bound on that side)
                                    "in <v1> <v2> ..."  (the allowed values)
                                    several rules joined by ";", e.g. "range 0 1; in 0 1"
    fleet.contract.from_reference   "<k>": every feature without a range of its own gets
                                    [lo - k (hi - lo), hi + k (hi - lo)], lo and hi its reference
                                    histogram's outer edges (the 0.5th and 99.5th percentiles of
                                    the training rows): derived from the version's statistics
    fleet.contract.mode             "reject" (default) or "warn"

Every feature must also be finite (NaN and ±Inf are always refused: the model cannot take them).
`reject`: a request with a violating row is answered 400 naming the row, the feature, its value
and the rule, while the other requests of its batch are answered. `warn`: the row is served,
counted in `fleet_input_violations_total{model,feature,rule}` and flagged in the prediction
log's `violations` column ("feature:rule,..."). Range and finiteness run in `native.check_bounds`
over the whole batch; the allowed-values rule is a vectorised `np.isin` per feature that has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import native
from serving.errors import InvalidInput, RepositoryError

__all__ = ["CONTRACT_PREFIX", "MODE_PARAM", "FROM_REFERENCE_PARAM", "Contract", "parse_contract", "RowFlags"]

CONTRACT_PREFIX = "fleet.contract."
MODE_PARAM = "fleet.contract.mode"
FROM_REFERENCE_PARAM = "fleet.contract.from_reference"
MODES = ("reject", "warn")
_RULE_NAMES = ("range", "finite", "in")


class RowFlags:
    """The contract rules each row of a request broke in warn mode: object [rows] of "feature:rule,..." or None."""

    __slots__ = ("rows",)

    def __init__(self, rows: np.ndarray):
        self.rows = rows


@dataclass(frozen=True)
class Contract:
    """The checked rules of one version's features (see the module doc)."""

    names: tuple[str, ...]
    lo: np.ndarray  # float32 [d]
    hi: np.ndarray  # float32 [d]
    allowed: Mapping[int, np.ndarray]  # feature index -> its allowed values (float32)
    mode: str
    source: Mapping[int, str]  # feature index -> where its range came from ("config" | "reference")

    def describe(self, j: int, rule: str) -> str:
        if rule == "finite":
            return "finite (no NaN or infinity)"
        if rule == "in":
            return "in {" + ", ".join(f"{v:g}" for v in self.allowed[j]) + "}"
        where = " (derived from the version's reference statistics)" if self.source.get(j) == "reference" else ""
        return f"range [{self.lo[j]:g}, {self.hi[j]:g}]{where}"

    def check(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[tuple[str, str], int]]:
        """(first [n]: the first violating feature of each row or -1, rule [n]: its rule index, counts)."""
        n, d = x.shape
        first = np.empty(n, np.int32)
        counts = np.zeros((2, d), np.int64)
        native.check_bounds(x, self.lo, self.hi, first, counts)
        rule = np.where(first >= 0, np.where(np.isfinite(x[np.arange(n), np.maximum(first, 0)]), 0, 1), -1)
        totals: dict[tuple[str, str], int] = {}
        for j in np.flatnonzero(counts[0]):
            totals[(self.names[j], "range")] = int(counts[0, j])
        for j in np.flatnonzero(counts[1]):
            totals[(self.names[j], "finite")] = int(counts[1, j])
        for j, values in self.allowed.items():
            column = x[:, j]
            outside = np.isfinite(column) & ~np.isin(column, values)
            hits = int(outside.sum())
            if hits:
                totals[(self.names[j], "in")] = hits
                take = outside & ((first < 0) | (first > j))
                first[take] = j
                rule[take] = 2
        return first, rule, totals

    def flags(self, x: np.ndarray) -> np.ndarray:
        """Every rule each row breaks, as "feature:rule,..." (None for a clean row): the log's column."""
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(x)
            broken = [(~finite, "finite"), (finite & ((x < self.lo) | (x > self.hi)), "range")]
        out = np.full(len(x), None, object)
        marks: list[list[str]] = [[] for _ in range(len(x))]
        for mask, rule in broken:
            for i, j in zip(*np.nonzero(mask)):
                marks[i].append(f"{self.names[j]}:{rule}")
        for j, values in self.allowed.items():
            for i in np.flatnonzero(np.isfinite(x[:, j]) & ~np.isin(x[:, j], values)):
                marks[i].append(f"{self.names[j]}:in")
        for i, m in enumerate(marks):
            if m:
                out[i] = ",".join(m)
        return out


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RepositoryError(f"{where}: {text!r} is not a number") from None
    if math.isnan(value):
        raise RepositoryError(f"{where}: NaN is not a bound")
    return value


def parse_contract(parameters: Mapping[str, str], names: Sequence[str], reference_edges: np.ndarray | None,
                   source: str = "config.pbtxt") -> Contract | None:
    """The contract a model's parameters declare for features `names` (None when they declare none)."""
    keys = [k for k in parameters if k.startswith(CONTRACT_PREFIX)]
    if not keys:
        return None
    d = len(names)
    lo = np.full(d, -np.inf, np.float32)
    hi = np.full(d, np.inf, np.float32)
    allowed: dict[int, np.ndarray] = {}
    origin: dict[int, str] = {}
    mode = parameters.get(MODE_PARAM, "reject")
    if mode not in MODES:
        raise RepositoryError(f"{source}: {MODE_PARAM} must be one of {list(MODES)}, got {mode!r}")
    index = {n: j for j, n in enumerate(names)}
    for key in keys:
        if key in (MODE_PARAM, FROM_REFERENCE_PARAM):
            continue
        feature = key[len(CONTRACT_PREFIX):]
        where = f"{source}: {key}"
        if feature not in index:
            raise RepositoryError(f"{where}: {feature!r} is not one of the model's features {list(names)}")
        j = index[feature]
        for rule in (r.strip() for r in parameters[key].split(";")):
            words = rule.split()
            if not words:
                continue
            kind, args = words[0], words[1:]
            if kind == "range" and len(args) == 2:
                low, high = _number(args[0], where), _number(args[1], where)
                if low > high:
                    raise RepositoryError(f"{where}: range {low:g} {high:g} is empty")
                lo[j], hi[j] = low, high
                origin[j] = "config"
            elif kind == "in" and args:
                allowed[j] = np.array(sorted({_number(a, where) for a in args}), np.float32)
            elif kind == "finite" and not args:
                pass  # always checked
            else:
                raise RepositoryError(f"{where}: rules are 'range <lo> <hi>', 'in <v> ...' or 'finite', joined "
                                      f"by ';'; got {rule!r}")
    if FROM_REFERENCE_PARAM in parameters:
        k = _number(parameters[FROM_REFERENCE_PARAM], f"{source}: {FROM_REFERENCE_PARAM}")
        if k < 0:
            raise RepositoryError(f"{source}: {FROM_REFERENCE_PARAM} must be >= 0, got {k:g}")
        if reference_edges is None:
            raise RepositoryError(f"{source}: {FROM_REFERENCE_PARAM} needs the version's reference histograms "
                                  "(metadata.json reference_stats edges)")
        for j in range(d):
            if j in origin:
                continue
            e_lo, e_hi = float(reference_edges[j, 0]), float(reference_edges[j, -1])
            span = e_hi - e_lo
            lo[j], hi[j] = e_lo - k * span, e_hi + k * span
            origin[j] = "reference"
    return Contract(tuple(names), lo, hi, allowed, mode, origin)


def refuse(contract: Contract, x_row: np.ndarray, row: int, j: int, rule_index: int, input_name: str) -> InvalidInput:
    """The 400 of a request whose `row` broke feature j's rule."""
    rule = _RULE_NAMES[rule_index]
    return InvalidInput(f"input {input_name!r}: row {row} feature {contract.names[j]!r} = {float(x_row[j]):g} "
                        f"breaks its contract: {contract.describe(j, rule)}")
