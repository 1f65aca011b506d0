"""Input contracts on a live cluster: a row breaking a rule gets a 400 naming it while its batch neighbours are
answered (reject), or is served, counted and flagged in the prediction log (warn)."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest

from integration._monitoring import fraud_rows, metric_value, read_log, wait_until

pytestmark = pytest.mark.integration


def _body(row: np.ndarray, rid: str) -> dict:
    return {"id": rid, "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                   "data": row.astype(np.float32).tolist()}]}


def _concurrently(base_url: str, model: str, rows: np.ndarray, prefix: str) -> list[httpx.Response]:
    """One request per row, all at once on one connection pool: they share batches."""
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=len(rows))) as client:
        with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
            return list(pool.map(lambda i: client.post(f"{base_url}/v2/models/{model}/infer",
                                                       json=_body(rows[i], f"{prefix}-{i}")), range(len(rows))))


def test_reject_mode_answers_400_naming_the_feature_and_rule_and_serves_the_neighbours(base_url):
    x, _ = fraud_rows(16, seed=41)
    x[3, 0] = -5.0  # amount below its range [0, 100000]
    x[9, 7] = 0.5  # is_foreign not in {0, 1}
    answers = _concurrently(base_url, "fraud_contract", x, "contract")
    statuses = [r.status_code for r in answers]
    assert statuses == [400 if i in (3, 9) else 200 for i in range(16)], statuses
    assert answers[3].json()["error"] == ("input 'features': row 0 feature 'amount' = -5 breaks its contract: "
                                          "range [0, 100000]")
    assert answers[9].json()["error"] == ("input 'features': row 0 feature 'is_foreign' = 0.5 breaks its contract: "
                                          "in {0, 1}")
    # Counted by the replica that refused it, in /metrics once that replica has pushed (every 0.5 s here).
    wait_until(lambda: metric_value(httpx.get(f"{base_url}/metrics", timeout=30).text, "fleet_input_violations_total",
                                    model="fraud_contract", feature="amount", rule="range") == 1.0, 10,
               what="the refused row counted")


def test_warn_mode_serves_the_row_counts_it_and_flags_it_in_the_log(fleet_cluster, base_url):
    settings = fleet_cluster[0]
    x, _ = fraud_rows(8, seed=42)
    x[2, 7] = 3.0  # is_foreign: not in {0, 1}
    x[5, 0] = 1e7  # amount: far beyond its reference range (from_reference 1)
    answers = _concurrently(base_url, "fraud_contract_warn", x, "warn")
    assert [r.status_code for r in answers] == [200] * 8
    def counted():  # each by the replica that served it, in /metrics once it has pushed (every 0.5 s here)
        text = httpx.get(f"{base_url}/metrics", timeout=30).text
        return [metric_value(text, "fleet_input_violations_total", model="fraud_contract_warn", feature=f, rule=r)
                for f, r in (("amount", "range"), ("is_foreign", "in"), ("is_foreign", "range"))]

    assert wait_until(lambda: None not in (c := counted()) and c, 10, what="violations counted") == [1.0, 1.0, 1.0]
    table = wait_until(lambda: (t := read_log(settings.data_dir, "fraud_contract_warn")).num_rows >= 8 and t, 15,
                       what="the warn rows logged")
    flags = dict(zip(table["request_id"].to_pylist(), table["violations"].to_pylist()))
    # is_foreign = 3 breaks its allowed values and the range derived from its reference ([0, 1] widened by 1)
    assert flags["warn-2"] == "is_foreign:range,is_foreign:in" and flags["warn-5"] == "amount:range"
    assert all(flags[f"warn-{i}"] is None for i in (0, 1, 3, 4, 6, 7))
