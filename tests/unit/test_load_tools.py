"""The benchmark load tools without sockets or processes: summary math, the result record,
open-loop schedules, target mixing, the minimal HTTP/1.1 response parser, wrk's report
parsing and the report plots."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from benchmarks.http_client import ResponseParser, parse_head
from benchmarks.load import LATENCY_KEYS, LoadResult, count_2xx, summarize
from benchmarks.loadgen import (
    Target,
    _result,
    arrival_times,
    choose_targets,
    open_loop,
    run,
    step_arrival_times,
)
from benchmarks.plots import (
    plot_batch_sizes,
    plot_latency_vs_throughput,
    plot_step_load,
)
from benchmarks.wrk import WrkError, parse_report, wrk_command

MS = 1_000_000  # ns

# A line wrk 4.1.0 printed through benchmarks/lua/report.lua (2 threads, 1/3 of answers 503).
WRK_LINE = (
    'WRK_JSON {"duration_us":1099898,"requests":34064,"bytes":1555561,"errors":{"connect":0,"read":0,'
    '"write":0,"status":11353,"timeout":2},"latency_us":{"mean":139.886,"p50":123,"p90":150,"p95":162,'
    '"p99":321,"max":3283},"threads":2,"statuses":{"200":22711,"503":11353}}'
)


# --- summary and result record ---------------------------------------------------------

def test_summarize_matches_numpy_percentiles_in_ms():
    ns = np.random.default_rng(3).lognormal(mean=15, sigma=1, size=10_001)
    got = summarize(ns)
    assert list(got) == list(LATENCY_KEYS)
    ms = ns / 1e6
    for key, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert got[key] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert got["mean"] == pytest.approx(ms.mean()) and got["max"] == pytest.approx(ms.max())
    assert summarize([1 * MS, 2 * MS, 3 * MS, 4 * MS]) == pytest.approx(
        {"mean": 2.5, "p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97, "max": 4.0})


def test_summarize_empty_is_none_and_serializable():
    assert summarize([]) == {key: None for key in LATENCY_KEYS}
    assert json.loads(json.dumps(summarize(np.array([])))) == {key: None for key in LATENCY_KEYS}


def test_load_result_round_trips_through_json():
    result = LoadResult(
        tool="asyncio", mode="open", connections=None, rate_rps=250.0, duration_s=2.01, requests=500,
        throughput_rps=240.0, latency_ms=summarize([MS, 5 * MS]), statuses={"200": 482, "503": 18},
        errors={"timeout": 3}, by_target={"a": {"requests": 400}},
    )
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert LoadResult.from_dict(json.loads(text)) == result
    empty = LoadResult("wrk", "closed", 8, None, 1.0, 0, 0.0, summarize([]), {}, {"connect": 8})
    back = LoadResult.from_dict(json.loads(json.dumps(empty.to_dict(), allow_nan=False)))
    assert back == empty and back.latency_ms["p99"] is None


def test_nan_latency_becomes_null_in_json():
    result = LoadResult("wrk", "closed", 1, None, 1.0, 0, 0.0, dict.fromkeys(LATENCY_KEYS, math.nan), {}, {})
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["latency_ms"]["p50"] is None


def test_only_2xx_count_as_throughput():
    assert count_2xx({"200": 5, "204": 1, "299": 1, "300": 7, "503": 9, "199": 2}) == 7


def test_records_summarize_per_target_with_rate_shares():
    targets = [Target("/a", b"", {}, weight=3, name="a"), Target("/b", b"", {}, weight=1, name="b")]
    # target, intended s, status, latency s, error (0 none, 1 connect, 4 timeout)
    records = np.array([
        [0, 0.0, 200, 0.001, 0], [0, 0.1, 200, 0.003, 0], [0, 0.2, 503, 0.002, 0],
        [1, 0.3, 200, 0.010, 0], [1, 0.4, 0, math.nan, 4], [0, 0.5, 0, math.nan, 1],
    ])
    r = _result(records, targets, "open", None, 100, 2.0)
    assert (r.requests, r.statuses, r.errors) == (4, {"200": 3, "503": 1}, {"connect": 1, "timeout": 1})
    assert r.throughput_rps == 1.5 and r.latency_ms["max"] == pytest.approx(10.0)
    a, b = r.by_target["a"], r.by_target["b"]
    assert (a["rate_rps"], a["requests"], a["statuses"], a["errors"]) == (75.0, 3, {"200": 2, "503": 1}, {"connect": 1})
    assert (b["rate_rps"], b["requests"], b["errors"], b["by_target"]) == (25.0, 1, {"timeout": 1}, {})


# --- schedules and target choice -------------------------------------------------------

def test_constant_arrivals_are_exactly_evenly_spaced():
    t = arrival_times(200, 2.0, "constant")
    assert len(t) == 400 and t[0] == 0.0 and t[-1] < 2.0
    np.testing.assert_allclose(np.diff(t), 1 / 200, rtol=0, atol=1e-12)
    assert len(arrival_times(3, 1.0, "constant")) == 3


def test_poisson_arrivals_have_the_mean_rate_and_exponential_gaps():
    t = arrival_times(1000, 100.0, "poisson", seed=7)
    assert len(t) == pytest.approx(100_000, rel=0.02)
    assert np.all(np.diff(t) > 0) and 0 <= t[0] and t[-1] < 100.0
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: CV 1


def test_arrivals_are_reproducible_per_seed():
    np.testing.assert_array_equal(arrival_times(50, 10, seed=1), arrival_times(50, 10, seed=1))
    assert not np.array_equal(arrival_times(50, 10, seed=1), arrival_times(50, 10, seed=2))


def test_step_schedule_is_continuous_and_follows_each_rate():
    offsets, step = step_arrival_times([100, 300, 1000], 5.0, "constant")
    assert np.bincount(step).tolist() == [500, 1500, 5000]
    assert np.all(np.diff(offsets) > 0)
    assert np.all((offsets >= step * 5.0) & (offsets < (step + 1) * 5.0))
    offsets, step = step_arrival_times([100, 1000], 20.0, "poisson", seed=4)
    assert np.bincount(step) / 20.0 == pytest.approx([100, 1000], rel=0.1)


@pytest.mark.parametrize("bad", [{"rate_rps": 0}, {"rate_rps": -1}, {"duration_s": 0}, {"arrivals": "burst"}])
def test_bad_schedules_are_rejected(bad):
    args = {"rate_rps": 10, "duration_s": 1.0, "arrivals": "poisson"} | bad
    with pytest.raises(ValueError):
        arrival_times(**args)


def test_targets_are_chosen_by_weight_reproducibly():
    picks = choose_targets([3.0, 1.0], 100_000, seed=5)
    assert np.mean(picks == 0) == pytest.approx(0.75, abs=0.01)
    np.testing.assert_array_equal(picks, choose_targets([3.0, 1.0], 100_000, seed=5))
    assert set(choose_targets([1.0], 10).tolist()) == {0}


async def test_bad_targets_are_rejected_before_any_connection():
    with pytest.raises(ValueError, match="at least one"):
        await open_loop("127.0.0.1", 9, [], 10, 1)
    with pytest.raises(ValueError, match="unique"):
        await open_loop("127.0.0.1", 9, [Target("/a", b"", {}), Target("/a", b"", {})], 10, 1)
    with pytest.raises(ValueError, match="weights"):
        await open_loop("127.0.0.1", 9, [Target("/a", b"", {}, weight=0)], 10, 1)


# --- the minimal HTTP/1.1 client -------------------------------------------------------

def test_request_bytes_carry_length_and_headers():
    t = Target("/v2/models/m/infer", b'{"a":1}', {"Content-Type": "application/json", "Content-Length": "99"})
    assert t.request_bytes("127.0.0.1", 8000) == (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 7\r\n"
        b"Content-Type: application/json\r\n\r\n{\"a\":1}"
    )


def test_parse_head():
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n") == (200, 12, False, True)
    assert parse_head(b"HTTP/1.1 503 Busy\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n") == (503, 0, False, False)
    assert parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n")[3] is False
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n")[3] is True
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == (200, None, True, True)
    with pytest.raises(ValueError):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def _parser() -> tuple[ResponseParser, list[tuple[int, bytes, bool]]]:
    got: list[tuple[int, bytes, bool]] = []
    return ResponseParser(lambda status, body, keep_alive: got.append((status, body, keep_alive))), got


BACK_TO_BACK = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                b"HTTP/1.1 204 No Content\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n"
                b"Trailer: t\r\n\r\n"
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
PARSED = [(200, b"hello", True), (204, b"", True), (200, b"hello world", True), (503, b"busy", False)]


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(BACK_TO_BACK)])
def test_parser_reads_back_to_back_answers_fed_in_pieces_of_any_size(size):
    parser, got = _parser()
    for i in range(0, len(BACK_TO_BACK), size):
        parser.feed(BACK_TO_BACK[i:i + size])
    parser.feed_eof()
    assert got == PARSED


def test_parser_answers_each_response_as_soon_as_it_is_complete():
    parser, got = _parser()
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    parser.feed(first[:-1])
    assert got == []
    parser.feed(first[-1:] + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
    assert got == [(200, b"hello", True)]
    parser.feed(b"k")
    assert got == [(200, b"hello", True), (200, b"ok", True)]


def test_parser_reads_an_unframed_body_to_eof():
    parser, got = _parser()
    parser.feed(b"HTTP/1.0 200 OK\r\n\r\nall ")
    parser.feed(b"of it")
    assert got == []
    parser.feed_eof()
    assert got == [(200, b"all of it", False)]


@pytest.mark.parametrize("wire", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                                  b"HTTP/1.1 200 OK\r\nContent-Le",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"])
def test_parser_cut_off_raises_at_eof(wire):
    parser, got = _parser()
    parser.feed(wire)
    with pytest.raises(ValueError, match="closed"):
        parser.feed_eof()
    assert got == []
    idle, _ = _parser()
    idle.feed_eof()  # a connection closed between responses is not an error


@pytest.mark.parametrize("wire", [b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
                                  b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000])
def test_parser_rejects_garbage(wire):
    parser, _ = _parser()
    with pytest.raises(ValueError):
        parser.feed(wire)


def test_an_answer_that_comes_after_its_deadline_is_a_timeout_even_before_the_sweep_runs():
    from benchmarks.loadgen import _TIMEOUT, _Run, _clock

    async def classify() -> tuple[list, list]:
        load = _Run("127.0.0.1", 9, [Target("/", b"{}", {})], max_connections=1, timeout_s=0.2)
        now = _clock()
        for intended in (now - 0.25, now - 0.1):  # the first is past its 0.2 s deadline, the second is not
            for column, value in zip((load.target, load.intended, load.base, load.tag, load.status, load.error,
                                      load.latency), (0, intended, intended, 0, 0, 0, math.nan)):
                column.append(value)
            load.pending += 1
        load._finish(0, 200, 0)  # both answered now, before any timer ran
        load._finish(1, 200, 0)
        return load.status, load.error

    status, error = run(classify())
    assert status == [0, 200] and error == [_TIMEOUT, 0]


def test_run_uses_uvloop_when_installed():
    pytest.importorskip("uvloop")

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(loop_module()).startswith("uvloop")


# --- wrk --------------------------------------------------------------------------------

def test_parse_wrk_report():
    r = parse_report("Running 1s test\n  2 threads\n" + WRK_LINE + "\n", connections=4)
    assert (r.tool, r.mode, r.connections, r.requests) == ("wrk", "closed", 4, 34064)
    assert r.statuses == {"200": 22711, "503": 11353} and r.errors == {"timeout": 2}
    assert r.duration_s == pytest.approx(1.099898) and r.throughput_rps == pytest.approx(22711 / 1.099898)
    assert r.latency_ms == pytest.approx(
        {"mean": 0.139886, "p50": 0.123, "p90": 0.15, "p95": 0.162, "p99": 0.321, "max": 3.283})


def test_parse_wrk_report_without_responses_has_no_latencies():
    line = WRK_LINE.replace('"requests":34064', '"requests":0').replace('"200":22711,"503":11353', "")
    r = parse_report(line, connections=1)
    assert r.requests == 0 and r.latency_ms["p50"] is None and r.throughput_rps == 0.0
    with pytest.raises(WrkError):
        parse_report("unable to connect to 127.0.0.1:1 Connection refused\n", connections=1)


def test_wrk_command():
    argv = wrk_command("http://h:1/x", "/b.body", 123, connections=1, threads=4, duration_s=2.4, timeout_s=0.2,
                       headers={"Authorization": "Bearer t"})
    assert argv[:6] == ["wrk", "-t1", "-c1", "-d2s", "--timeout", "1s"]
    assert argv[-6:] == ["-H", "Authorization: Bearer t", "http://h:1/x", "--", "/b.body", "123"]
    assert wrk_command("http://h:1/x", "/b.body")[-2:] == ["--", "/b.body"]


# --- plots -------------------------------------------------------------------------------

def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def _run(system: str, body: str, c: int, rps: float, p50: float | None, p99: float | None, mode="closed") -> dict:
    return {"system": system, "body": body, "mode": mode, "connections": c, "throughput_rps": rps,
            "latency_ms": {"p50": p50, "p99": p99}}


def test_plots_write_pngs(tmp_path):
    runs = [_run(s, b, c, c * k * 100, 1 + c / k, 3 + c / k) for s, k in (("fleet", 3), ("triton", 4))
            for b in ("json", "binary") for c in (1, 4, 16, 64)]
    runs += [_run("fleet", "json", 128, 0.0, None, None), _run("fleet", "json", 0, 500, 2, 4, mode="open")]
    _assert_png(plot_latency_vs_throughput(runs, tmp_path / "lat.png"))
    _assert_png(plot_batch_sizes({"fleet": {1: 10, 8: 40, 16: 5}, "triton": {"4": 7, "32": 2}, "plain": {}},
                                 tmp_path / "sub" / "batch.png"))
    steps = [{"rate_rps": r, "throughput_rps": min(r, 400), "latency_ms": {"p99": 5 if r < 400 else None}}
             for r in (100, 200, 400)]
    _assert_png(plot_step_load({"fixed": steps, "adaptive": steps[:2]}, 50.0, tmp_path / "step.png"))


def test_plots_survive_empty_inputs(tmp_path):
    _assert_png(plot_latency_vs_throughput([], tmp_path / "a.png"))
    _assert_png(plot_batch_sizes({}, tmp_path / "b.png"))
    _assert_png(plot_step_load({}, None, tmp_path / "c.png"))
    _assert_png(plot_step_load({"p": [{"rate_rps": 10, "throughput_rps": None, "latency_ms": None}]}, 20, tmp_path / "d.png"))


def test_the_cache_and_tracing_goals_are_met_only_when_their_whole_interval_is():
    from benchmarks.protocols import extra_goals

    hit = {"hit": {"p50_us": 38.0}, "computed": {"p50_us": 550.0}}

    def alt(mean, low, high):
        return {"a_rps": 2000.0 * mean, "b_rps": 2000.0, "mean": mean, "ci95": [low, high], "n": 30}

    goals = extra_goals(hit, alt(2.1, 2.02, 2.2), alt(0.93, 0.91, 0.95))
    assert [g["met"] for g in goals] == [True, True, True]
    goals = extra_goals(hit, alt(2.1, 1.98, 2.2), alt(0.93, 0.89, 0.97))  # means pass, intervals do not
    assert [g["met"] for g in goals] == [True, False, False]
    assert goals[1]["ratio"] == 2.1 and goals[2]["ci95"] == [0.89, 0.97]
    empty = {"a_rps": None, "b_rps": None, "mean": None, "ci95": None, "n": 0}
    assert [g["met"] for g in extra_goals({"hit": {"p50_us": 200.0}, "computed": {"p50_us": 1.0}}, empty, empty)] \
        == [False, False, False]
