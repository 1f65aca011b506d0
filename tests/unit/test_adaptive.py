"""Adaptive batching: the service-time model, the policy's decisions, and the batcher in adaptive mode."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.adaptive import AdaptivePolicy, ServiceTimeModel
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
    assert policy.send_at_once(0, 1)
    assert policy.plan(0, queued_rows=1, head_wait_ns=0, inflight=0) is None


def test_the_batch_waits_for_the_rows_that_keep_the_model_half_idle():
    # a = 1 ms, c = 10 us/row, 20k rows/s, busy at most half the time:
    # 20000 * (0.001 + 0.00001 b) / b <= 0.5  <=>  b >= 20 / (0.5 - 0.2) = 66.7 -> 67
    policy = _learned(50, 0.001, 0.00001)
    now = _arrivals(policy, 20_000)
    assert policy.rate_rows_per_s == pytest.approx(20_000, rel=0.05)
    policy.replan(now)
    assert 60 <= policy.need_rows <= 75, policy.describe()
    assert not policy.send_at_once(now, 1)
    wait = policy.plan(now, queued_rows=10, head_wait_ns=0, inflight=0)
    assert wait is not None and 0 < wait <= policy.max_wait_ns
    assert policy.plan(now, queued_rows=policy.need_rows, head_wait_ns=0, inflight=0) is None
    # the oldest request's share of the budget is spent: go with what is there
    assert policy.plan(now, queued_rows=10, head_wait_ns=policy.max_wait_ns, inflight=0) is None


def test_a_lower_utilization_cap_asks_for_bigger_batches():
    rows = {}
    for u in (0.8, 0.5, 0.3):
        policy = AdaptivePolicy(50, 256, max_utilization=u)
        for b in (1, 8, 32, 64, 128, 1, 16):
            policy.on_batch(b, int((0.001 + 0.00001 * b) * 1e9))
        policy.replan(_arrivals(policy, 10_000))
        rows[u] = policy.need_rows
    assert rows[0.8] < rows[0.5] < rows[0.3], rows
    with pytest.raises(ValueError, match="max_utilization"):
        AdaptivePolicy(50, 256, max_utilization=0)


def test_at_low_load_every_request_goes_alone_at_once():
    # 100 rows/s of a 1 ms model: busy 10 % of the time with batches of one
    policy = _learned(50, 0.001, 0.00001)
    now = _arrivals(policy, 100, seconds=1.0)
    assert policy.send_at_once(now, 1)
    assert policy.need_rows == 1


def test_with_a_batch_running_the_rows_are_held_until_it_ends():
    policy = _learned(50, 0.001, 0.00001)
    now = _arrivals(policy, 20_000)
    policy.replan(now)
    # past the idle-model wait: a running batch still holds them (it wakes the batcher when it ends)
    assert policy.plan(now, queued_rows=10, head_wait_ns=policy.max_wait_ns + 1, inflight=1) is not None
    # a batch of the rows the rate needs goes into the next slot at once
    assert policy.plan(now, queued_rows=policy.need_rows, head_wait_ns=0, inflight=1) is None


def test_the_wait_leaves_room_for_two_batches_inside_the_budget():
    policy = _learned(20, 0.002, 0.00002)
    now = _arrivals(policy, 10_000)
    policy.replan(now)
    budget = policy.scale * 20 * MS
    assert policy.max_wait_ns + 2 * policy.model.predict(policy.need_rows) * 1e9 == pytest.approx(budget, rel=0.01)


def test_overload_asks_for_full_batches_up_to_the_cap():
    policy = _learned(100, 0.001, 0.0001)  # even full batches keep the model busier than half the time
    now = _arrivals(policy, 50_000, seconds=0.3)
    policy.replan(now)
    assert policy.need_rows == policy.max_batch_size


def test_the_rate_estimate_decays_when_arrivals_stop():
    policy = _learned(50, 0.001, 0.00001)
    now = _arrivals(policy, 20_000)
    policy.replan(now)
    assert policy.need_rows > 1
    policy.replan(now + 2 * 10**9)  # two quiet seconds later
    assert policy.need_rows == 1


def test_p99_over_the_target_from_its_own_waits_shrinks_the_plan_and_a_comfortable_p99_grows_it_back():
    policy = _learned(10, 0.001, 0.00001)
    start = policy.scale
    for _ in range(128):
        policy.on_latency(15 * MS, 8 * MS)
    assert policy.scale < start
    low = policy.scale
    for _ in range(64 * 40):  # the slow samples leave the window, then the plan grows
        policy.on_latency(2 * MS, 0)
    assert policy.scale > low
    assert policy.scale <= 0.9


def test_p99_over_the_target_without_waits_is_overload_and_leaves_the_plan_alone():
    policy = _learned(10, 0.001, 0.00001)
    start = policy.scale
    for _ in range(256):
        policy.on_latency(40 * MS, 100_000)  # 0.1 ms held of 40 ms: the model is the bottleneck
    assert policy.scale == start
    assert policy.describe()["p99_ms"] == pytest.approx(40.0)


def test_max_utilization_parameter_is_validated_when_the_config_is_read():
    for bad in ("abc", "0", "1.5", "-0.2", "nan"):
        config = make_config("m", [TensorSpec("x", "FP32", (3,))], [TensorSpec("y", "FP32", (3,))],
                             max_batch_size=8, parameters={"fleet.adaptive.max_utilization": bad})
        with pytest.raises(RepositoryError, match="max_utilization"):
            spec_from_config(config, name="m")
    config = make_config("m", [TensorSpec("x", "FP32", (3,))], [TensorSpec("y", "FP32", (3,))],
                         max_batch_size=8, parameters={"fleet.adaptive.max_utilization": "0.3"})
    assert spec_from_config(config, name="m").parameters["fleet.adaptive.max_utilization"] == "0.3"


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


async def test_adaptive_batcher_waiting_for_rows_after_a_full_pipeline_still_answers_everyone():
    # Regression: with every batch slot busy the loop sleeps until a batch ends; when the
    # batches ended with nothing queued, a later arrival that the policy holds for company
    # must still wake it (it used to wait forever).
    gate = asyncio.Event()  # the bursts' batches end when it is set: on a loaded machine 1 ms of sleep may be 10

    async def execute(inputs):
        await gate.wait()
        await asyncio.sleep(0.004)
        return {"y": inputs["x"] * 2}

    async def until_inflight(n: int) -> None:
        deadline = time.monotonic() + 5.0
        while batcher.inflight != n:
            assert time.monotonic() < deadline, f"{batcher.inflight} batches in flight, not {n}"
            await asyncio.sleep(0.001)

    batcher = Batcher("m:1", execute, BatcherConfig(max_batch_size=64, latency_target_ms=40, max_inflight_batches=2))
    policy = batcher.adaptive
    for rows in (1, 8, 32, 64, 1, 16):
        policy.on_batch(rows, int((0.004 + 0.00001 * rows) * 1e9))
    _arrivals(policy, 2_000, seconds=0.2, start_ns=time.monotonic_ns() - 200_000_000)

    async def one(i: int) -> float:
        result = await asyncio.wait_for(batcher.submit({"x": np.full((1, 3), i, np.float32)}, 1), 10.0)
        return float(result.outputs["y"][0, 0])

    policy.replan(time.monotonic_ns())
    need = policy.need_rows
    assert need > 1, policy.describe()
    # two bursts of a batch each fill both slots; they end with nothing queued
    first = [asyncio.ensure_future(one(i)) for i in range(need)]
    await until_inflight(1)
    second = [asyncio.ensure_future(one(need + i)) for i in range(need)]
    await until_inflight(2)
    gate.set()
    answers = await asyncio.gather(*first, *second)
    assert answers == [2.0 * i for i in range(2 * need)]
    # a lone arrival, held for company, is still sent once its wait is over
    assert await one(1000) == 2000.0
    await batcher.close()
