"""Input contracts: parsed from config parameters, derived from the reference, checked per batch (reject, warn)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import InvalidInput, RepositoryError
from serving.monitoring.contracts import RowFlags, parse_contract
from serving.preprocess import Standardize

NAMES = ("amount", "is_foreign", "hour")
EDGES = np.array([[0, 10, 100], [0, 0.5, 1], [0, 12, 24]], np.float32)


def test_rules_from_the_config_and_the_reference():
    c = parse_contract({"fleet.contract.amount": "range 0 inf", "fleet.contract.is_foreign": "in 0 1",
                        "fleet.contract.from_reference": "0.5"}, NAMES, EDGES)
    assert c.lo.tolist() == [0, -0.5, -12] and c.hi.tolist() == [np.inf, 1.5, 36]
    assert c.source == {0: "config", 1: "reference", 2: "reference"} and c.mode == "reject"
    assert c.describe(2, "range") == "range [-12, 36] (derived from the version's reference statistics)"
    assert parse_contract({}, NAMES, EDGES) is None


@pytest.mark.parametrize("params, message", [
    ({"fleet.contract.nope": "range 0 1"}, "not one of the model's features"),
    ({"fleet.contract.amount": "range 1 0"}, "is empty"),
    ({"fleet.contract.amount": "between 0 1"}, "rules are"),
    ({"fleet.contract.amount": "range a 1"}, "not a number"),
    ({"fleet.contract.mode": "log"}, "must be one of"),
])
def test_a_bad_rule_names_the_parameter(params, message):
    with pytest.raises(RepositoryError, match=message):
        parse_contract(params, NAMES, EDGES)


def test_check_counts_every_violation_and_names_the_first_of_each_row():
    c = parse_contract({"fleet.contract.amount": "range 0 1000", "fleet.contract.is_foreign": "in 0 1"}, NAMES, None)
    x = np.array([[5, 0, 3], [-1, 0.5, 3], [5, 2, 3], [np.nan, 1, 3]], np.float32)
    first, rule, totals = c.check(x)
    assert first.tolist() == [-1, 0, 1, 0] and rule.tolist() == [-1, 0, 2, 1]
    assert totals == {("amount", "range"): 1, ("amount", "finite"): 1, ("is_foreign", "in"): 2}
    assert c.flags(x).tolist() == [None, "amount:range,is_foreign:in", "is_foreign:in", "amount:finite"]


def make(mode: str) -> Standardize:
    contract = parse_contract({"fleet.contract.amount": "range 0 1000", "fleet.contract.mode": mode}, NAMES, None)
    return Standardize("features", np.zeros(3, np.float32), np.ones(3, np.float32), 10.0, contract=contract)


def test_reject_mode_refuses_only_the_request_with_the_bad_row():
    pre = make("reject")
    seen = []
    pre.on_violations = seen.append
    parts = [np.array([[5, 0, 3]], np.float32), np.array([[5, 0, 3], [2000, 0, 3]], np.float32)]
    _, errors = pre.assemble(parts)
    assert errors[0] is None and isinstance(errors[1], InvalidInput)
    assert str(errors[1]) == "input 'features': row 1 feature 'amount' = 2000 breaks its contract: range [0, 1000]"
    assert seen == [{("amount", "range"): 1}]


def test_warn_mode_serves_the_row_and_flags_it():
    pre = make("warn")
    parts = [np.array([[2000, 0, 3], [1, 0, 3]], np.float32), np.array([[1, 0, 3]], np.float32)]
    _, errors = pre.assemble(parts)
    assert isinstance(errors[0], RowFlags) and errors[0].rows.tolist() == ["amount:range", None]
    assert errors[1] is None
    nan = [np.array([[np.nan, 0, 3]], np.float32)]
    assert isinstance(pre.assemble(nan)[1][0], InvalidInput)  # NaN is refused in either mode
