"""Adaptive batching: the service-time model, the policy's decisions, and the batcher in adaptive mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.adaptive import AdaptivePolicy, CpuCostModel, ServiceTimeModel
from serving.batching import Batcher, BatcherConfig
from serving.errors import RepositoryError
from serving.model_config import TensorSpec, make_config, spec_from_config

MS = 1_000_000  # ns


def test_service_time_model_recovers_fixed_and_per_row_cost_from_noisy_batches():
    rng = np.random.default_rng(0)
    model = ServiceTimeModel()
    for _ in range(400):
        rows = int(rng.integers(1, 257))
        model.observe(rows, 0.002 + 0.00005 * rows + rng.normal(0, 0.0001))
    a, c = model.coefficients()
    assert a == pytest.approx(0.002, rel=0.15)
    assert c == pytest.approx(0.00005, rel=0.1)
    assert model.predict(100) == pytest.approx(0.007, rel=0.05)


def test_service_time_model_with_one_batch_size_counts_everything_as_fixed_cost():
    model = ServiceTimeModel()
    for _ in range(10):
        model.observe(4, 0.003)
    assert model.coefficients() == pytest.approx((0.003, 0.0))


def test_service_time_model_forgets_old_behaviour():
    model = ServiceTimeModel(decay=0.9)
    for rows in range(1, 100):
        model.observe(rows, 0.010)
    for rows in range(1, 100):
        model.observe(rows, 0.001)
    assert model.predict(50) == pytest.approx(0.001, rel=0.1)


def test_cpu_cost_model_separates_per_request_from_per_batch_cpu():
    rng = np.random.default_rng(1)
    model = CpuCostModel()
    for _ in range(300):
        requests = int(rng.integers(50, 400))
        batches = max(1, requests // int(rng.integers(1, 40)))
        model.observe(requests, batches, 150e-6 * requests + 400e-6 * batches + rng.normal(0, 1e-4))
    per_request, per_batch = model.coefficients()
    assert per_request == pytest.approx(150e-6, rel=0.1)
    assert per_batch == pytest.approx(400e-6, rel=0.15)


def test_a_costly_batch_makes_the_policy_wait_for_bigger_batches_as_the_rate_rises():
    policy = _learned(50, 0.0002, 0.000001)
    for batches in [50, 10, 25, 5] * 10:  # 150 us CPU per request, 600 us per batch
        policy.cpu.observe(100, batches, 100 * 150e-6 + batches * 600e-6)
    now = _arrivals(policy, 1000)
    policy.replan(now)
    low = policy.need_rows
    now = _arrivals(policy, 4500, start_ns=now + 1, seconds=1.0)
    policy._planned_ns = -1
    policy.replan(now)
    # low load: the batch pays for itself at 600 / (0.25 * 150) = 16 rows;
    # 4500*1.2 = 5400/s: spare 0.9 - 0.81 = 0.09 s/s, so b >= 5400*600e-6/0.09 = 36
    assert low == 16 and 30 <= policy.need_rows <= 42, policy.describe()


def _learned(target_ms: float, a_s: float, c_s: float, max_batch: int = 256) -> AdaptivePolicy:
    policy = AdaptivePolicy(target_ms, max_batch)
    for rows in (1, 8, 32, 64, 128, 1, 16):
        policy.on_batch(rows, int((a_s + c_s * rows) * 1e9))
    return policy


def _arrivals(policy: AdaptivePolicy, rate_per_s: float, seconds: float = 0.5, start_ns: int = 1) -> int:
    gap = int(1e9 / rate_per_s)
    now = start_ns
    for _ in range(int(rate_per_s * seconds)):
        policy.on_arrival(now, 1)
        now += gap
    return now


def test_with_no_traffic_measured_a_queued_request_goes_at_once():
    policy = _learned(20, 0.001, 0.00001)
    assert policy.plan(0, queued_rows=1, head_wait_ns=0, inflight=1) is None


def test_the_batch_waits_for_the_rows_the_arrival_rate_needs():
    # a = 1 ms, c = 10 us/row, 20k rows/s with 20 % headroom: b >= 24000*0.001/(1-0.24) = 31.6 -> 32
    policy = _learned(50, 0.001, 0.00001)
    now = _arrivals(policy, 20_000)
    assert policy.rate_rows_per_s == pytest.approx(20_000, rel=0.05)
    policy.replan(now)
    assert 28 <= policy.need_rows <= 36
    wait = policy.plan(now, queued_rows=10, head_wait_ns=0, inflight=1)
    assert wait is not None and 0 < wait <= policy.max_wait_ns
    assert policy.plan(now, queued_rows=policy.need_rows, head_wait_ns=0, inflight=1) is None
    # the oldest request's share of the budget is spent: go with what is there
    assert policy.plan(now, queued_rows=10, head_wait_ns=policy.max_wait_ns, inflight=1) is None
    # nothing running: never hold a request back
    assert policy.plan(now, queued_rows=1, head_wait_ns=0, inflight=0) is None


def test_the_wait_leaves_room_for_two_batches_inside_the_budget():
    policy = _learned(20, 0.002, 0.00002)
    now = _arrivals(policy, 10_000)
    policy.replan(now)
    budget = policy.scale * 20 * MS
    assert policy.max_wait_ns + 2 * policy.model.predict(policy.need_rows) * 1e9 == pytest.approx(budget, rel=0.01)


def test_the_batch_waits_until_its_overhead_is_a_small_share_of_its_requests_cost():
    # 100 us CPU per request, 500 us per batch: a batch of 20 keeps the overhead at a quarter
    policy = _learned(10, 0.0001, 0.000001)
    for batches in [40, 8, 20, 4] * 10:
        policy.cpu.observe(200, batches, 200 * 100e-6 + batches * 500e-6)
    policy.replan(_arrivals(policy, 100))
    assert policy.need_rows == 20
    assert policy.plan(10**12, queued_rows=5, head_wait_ns=0, inflight=1) is not None  # waits for company
    assert policy.plan(10**12, queued_rows=5, head_wait_ns=policy.max_wait_ns, inflight=1) is None  # not past budget


def test_overload_asks_for_full_batches_up_to_the_cap():
    policy = _learned(100, 0.001, 0.0001)  # at most 10k rows/s even with infinite batches
    now = _arrivals(policy, 50_000, seconds=0.3)
    policy.replan(now)
    assert policy.need_rows == policy.max_batch_size


def test_p99_over_the_target_shrinks_the_plan_and_a_comfortable_p99_grows_it_back():
    policy = _learned(10, 0.001, 0.00001)
    start = policy.scale
    for _ in range(128):
        policy.on_latency(15 * MS)
    assert policy.scale < start
    low = policy.scale
    for _ in range(64 * 40):  # the slow samples leave the window, then the plan grows
        policy.on_latency(2 * MS)
    assert policy.scale > low
    assert policy.scale <= 0.9


def test_latency_target_parameter_is_validated_when_the_config_is_read():
    for bad in ("abc", "-1", "0", "inf"):
        config = make_config("m", [TensorSpec("x", "FP32", (3,))], [TensorSpec("y", "FP32", (3,))],
                             max_batch_size=8, parameters={"latency_target_ms": bad})
        with pytest.raises(RepositoryError, match="latency_target_ms"):
            spec_from_config(config, name="m")
    config = make_config("m", [TensorSpec("x", "FP32", (3,))], [TensorSpec("y", "FP32", (3,))],
                         max_batch_size=8, parameters={"latency_target_ms": "12.5"})
    assert spec_from_config(config, name="m").parameters["latency_target_ms"] == "12.5"


async def test_adaptive_batcher_answers_every_request_correctly_and_learns_the_model():
    calls: list[int] = []

    async def execute(inputs):
        rows = len(inputs["x"])
        calls.append(rows)
        await asyncio.sleep(0.001 + 0.00002 * rows)
        return {"y": inputs["x"] * 10}

    batcher = Batcher("m:1", execute, BatcherConfig(max_batch_size=64, latency_target_ms=50))
    assert batcher.adaptive is not None

    async def client(i: int):
        out = []
        for j in range(40):  # long enough (> 100 ms) for a rate estimate
            x = np.full((1, 3), i * 100 + j, dtype=np.float32)
            result = await batcher.submit({"x": x}, 1)
            out.append(float(result.outputs["y"][0, 0]) == (i * 100 + j) * 10)
            await asyncio.sleep(0.003)
        return out

    results = await asyncio.gather(*(client(i) for i in range(32)))
    await batcher.close()
    assert all(all(r) for r in results)
    assert sum(calls) == 32 * 40
    assert max(calls) <= 64 and max(calls) > 1
    described = batcher.adaptive.describe()
    assert batcher.adaptive.model.samples == len(calls)
    assert described["batch_fixed_us"] > 0 and described["rate_rows_per_s"] > 0
