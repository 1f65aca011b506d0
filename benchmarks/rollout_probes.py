"""The probes `benchmarks.rollout_trials` runs alone on the cluster before its trials.

- `routing_probe`: peak throughput (wrk, closed loop) of one model with no rollout and with a
  rollout at 5 or 50 % to an identical copy, ABAB: what canary routing costs. On the small fraud
  model, where a model execution's fixed cost outweighs its rows', and on `wide_model_file`'s,
  where the rows cost most.
- `shadow_probe`: client latency at a fixed open-loop rate with no rollout and while every request
  is copied to an identical candidate (shadow share 1.0), ABBA: what shadowing adds to the stable path.
- `leak_probe`: wrk at peak on a model in shadow mode until N answers, each answer's
  `model_version` counted (`WRK_COUNT_VERSIONS` in `benchmarks/lua/report.lua`): shadow answers
  that reached a client.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson

from benchmarks.rollout_live import Stream, rows_per_batch, version_counts

__all__ = ["routing_probe", "shadow_probe", "leak_probe", "warm_version", "wide_model_file"]


def wide_model_file(features: int, width: int = 1024, seed: int = 0) -> bytes:
    """TorchScript of a fraud-shaped model (`features` in, a probability out) whose compute grows with its rows:
    two hidden layers of `width` (about a million multiply-adds a row at 1024)."""
    import io

    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 1), torch.nn.Sigmoid()).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    return buf.getvalue()


# -- ---------------------------------------------------------------------------
async def _wrk_runs(url: str, body_file: Path, runs: int, seconds: float) -> list[float]:
    from benchmarks.wrk import run_wrk

    await asyncio.to_thread(run_wrk, url, body_file, None, 64, 2, 3.0)  # warm-up, not counted
    out = []
    for _ in range(runs):
        result = await asyncio.to_thread(run_wrk, url, body_file, None, 64, 2, seconds)
        out.append(result.throughput_rps)
    return out


async def warm_version(ctx: dict, model: str, version: int, max_rows: int = 32, rounds: int = 3,
                       timeout_s: float = 60.0) -> None:
    """Wait until `version` answers by its URL on fresh connections (both ingress replicas), then run it on every
    batch size up to `max_rows`, `rounds` times: requests that name a version are not the rollout's evidence, and
    TorchScript specialises a model to each new batch shape on its first calls (a cold candidate beside a warm
    stable is slower for its first batches of each size)."""
    import aiohttp

    url = f"{ctx['url']}/v2/models/{model}/versions/{version}/infer"

    def body(rows: int) -> bytes:
        return orjson.dumps({"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32",
                                         "data": [0.1] * (30 * rows)}]})

    connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time: both replicas get some
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def ok(rows: int) -> bool:
            async with session.post(url, data=body(rows), headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status == 200

        deadline = time.monotonic() + timeout_s
        while not all(await asyncio.gather(*(ok(1) for _ in range(12)))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} version {version} not answering by its URL within {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
        for _ in range(rounds):
            await asyncio.gather(*(ok(rows) for rows in range(1, max_rows + 1) for _ in range(2)))


async def routing_probe(ctx: dict, model: str, weight: float, rounds: int, runs: int, seconds: float, log=print,
                        attempts: int = 3, file: bytes | None = None) -> dict:
    """Peak throughput of `model` with no rollout and with a rollout at `weight` (its first stage, which never
    passes) to an identical copy (ABAB) of `file` (default: ctx["file"], fraud version 1). The candidate is warmed by its URL before wrk starts; a rollout the judge
    ends during the runs (a false rollback: the copy is identical) is recorded, its runs dropped, and a new copy
    published (at most `attempts` a round)."""
    from benchmarks.bodies import request_bodies

    admin, repo = ctx["admin"], ctx["repo"]
    body_file = ctx["work"] / f"{model}.body"
    body_file.write_bytes(request_bodies(ctx["repo_dir"], model)["json"][0])
    url = f"{ctx['url']}/v2/models/{model}/infer"
    out: dict = {"model": model, "weight": weight, "idle": [], "rollout": [], "round_losses": [], "shares": [], "false_rollbacks": [],
                 "rows_per_batch": {"idle": [], "rollout": []}, "load_avg_1m": []}
    for r in range(rounds):
        m_idle = await admin.metrics()
        idle = await _wrk_runs(url, body_file, runs, seconds)
        out["rows_per_batch"]["idle"].append(rows_per_batch(m_idle, await admin.metrics(), model))
        busy = None
        for _ in range(attempts):
            version = await asyncio.to_thread(repo.publish, model, {"model.pt": file or ctx["file"]},
                                              {**ctx["metadata"], "gate": "accepted", "note": "routing probe"})
            await admin.wait(model, lambda s: s.get("candidate") == version and s["status"] == "canary", 60,
                             "the canary")
            await warm_version(ctx, model, version)
            m0 = await admin.metrics()
            runs_done = await _wrk_runs(url, body_file, runs, seconds)
            m1 = await admin.metrics()
            state = await admin.rollout(model)
            if state["status"] == "canary" and state.get("candidate") == version and state.get("weight") == weight:
                busy = runs_done
                await admin.act(model, "abort")
                break
            record = admin.decision_record(model, version) or {}
            out["false_rollbacks"].append({"version": version, "event": record.get("event"),
                                           "reason": record.get("reason"), "arms": record.get("arms")})
            log(f"  routing round {r}: identical version {version} ended by the judge during the runs: "
                f"{record.get('reason')}; its runs dropped")
        await asyncio.sleep(3.0)
        if busy is None:
            continue
        stable = state["stable"]
        out["rows_per_batch"]["rollout"].append(rows_per_batch(m0, m1, model))
        cand = version_counts(m1, model, version)["success"] - version_counts(m0, model, version)["success"]
        stab = version_counts(m1, model, stable)["success"] - version_counts(m0, model, stable)["success"]
        out["shares"].append(cand / (cand + stab) if cand + stab else None)
        out["idle"] += idle
        out["rollout"] += busy
        out["round_losses"].append(1 - float(np.median(busy)) / float(np.median(idle)))
        out["load_avg_1m"].append(round(os.getloadavg()[0], 2))
        log(f"  routing round {r}: idle {', '.join(f'{x:,.0f}' for x in idle)} req/s; rollout at {100 * weight:g} % "
            f"{', '.join(f'{x:,.0f}' for x in busy)} req/s (candidate answered {out['shares'][-1]:.1%}); rows per "
            f"model execution {out['rows_per_batch']['idle'][-1]} idle, {out['rows_per_batch']['rollout'][-1]} in the "
            "rollout")
    if out["idle"] and out["rollout"]:
        out["idle_median"] = float(np.median(out["idle"]))
        out["rollout_median"] = float(np.median(out["rollout"]))
        out["loss"] = round(1 - out["rollout_median"] / out["idle_median"], 4)
    shares = [s for s in out["shares"] if s is not None]
    out["candidate_share"] = float(np.mean(shares)) if shares else None
    out.update(runs_per_phase=runs, run_s=seconds, connections=64)
    return out


async def shadow_probe(ctx: dict, rate: float, segment_s: float, rounds: int, log=print) -> dict:
    """Client latency of fraud_shadow at `rate` with no rollout and in shadow mode (share 1.0) to an identical copy,
    `rounds` of segments ABBA; every answer's model_version against the stable version. The p99 of each phase is
    of all its segments' requests pooled (one segment's p99 rests on a few dozen requests). A shadow rollout the
    judge ends by itself (a false rollback: the candidate is identical) is recorded, and a new identical version
    is published for the next shadow segment."""
    model, admin, repo = "fraud_shadow", ctx["admin"], ctx["repo"]
    stream = Stream(ctx["session"], ctx["url"], model, ctx["rows"], rate)
    segments, pooled, ended = [], {"no rollout": [], "shadow": []}, []
    warm = asyncio.get_running_loop().create_task(stream.run())
    await asyncio.sleep(5.0)  # warm-up, not measured
    for phase in ("no rollout", "shadow", "shadow", "no rollout") * rounds:
        state = await admin.rollout(model)
        if phase == "shadow" and state["status"] != "shadow":
            version = await asyncio.to_thread(repo.publish, model, {"model.pt": ctx["file"]},
                                              {**ctx["metadata"], "gate": "accepted", "note": "shadow probe"})
            await admin.wait(model, lambda s: s.get("candidate") == version and s["status"] == "shadow", 60,
                             "the shadow")
            await admin.wait(model, lambda s: ((s.get("shadow") or {}).get("pairs") or 0) > 200 or s["status"] != "shadow",
                             60, "shadow pairs from the replicas")
            await asyncio.sleep(3.0)
        if phase == "no rollout" and state["status"] != "idle":
            try:
                await admin.act(model, "abort")
            except RuntimeError:  # decided meanwhile
                pass
            await asyncio.sleep(5.0)
        state = await admin.rollout(model)
        stable, candidate = str(state["stable"]), state.get("candidate")
        before = (state.get("shadow") or {}).get("pairs") or 0
        window: Counter = Counter()
        stream.windows.append(window)
        stream.latencies = []
        started = time.time()
        await asyncio.sleep(segment_s)
        latencies, stream.latencies = np.asarray(stream.latencies), None
        pooled[phase].append(latencies)
        stream.windows.remove(window)
        state = await admin.rollout(model)
        pairs = ((state.get("shadow") or {}).get("pairs") or 0) - before if phase == "shadow" else None
        if phase == "shadow" and state["status"] != "shadow":  # the judge ended it during the segment
            record = ctx["admin"].decision_record(model, candidate) or {}
            ended.append({"version": candidate, "event": record.get("event"), "reason": record.get("reason"),
                          "shadow": record.get("shadow"), "after_s": round(record.get("time", started) - started, 1)})
            pairs = None
        seg = {"phase": phase, "requests": sum(window.values()), "status_at_end": state["status"],
               "load_avg_1m": os.getloadavg()[0],
               "p50_ms": float(np.percentile(latencies, 50)) * 1e3, "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
               "not_stable": sum(n for (s, v), n in window.items() if s == 200 and v != stable),
               "non200": sum(n for (s, _), n in window.items() if s != 200), "shadow_pairs": pairs,
               "shed": (state.get("shadow") or {}).get("shed")}
        segments.append(seg)
        log(f"  shadow probe: {phase}: {seg['requests']:,} requests, p50 {seg['p50_ms']:.2f} ms, "
            f"p99 {seg['p99_ms']:.2f} ms, not from stable {seg['not_stable']}, pairs {pairs}, status at the end "
            f"{state['status']}, load average {seg['load_avg_1m']:.1f}")
    await stream.stop()
    await warm
    p99 = {phase: float(np.percentile(np.concatenate(parts), 99)) * 1e3 for phase, parts in pooled.items()}
    p50 = {phase: float(np.percentile(np.concatenate(parts), 50)) * 1e3 for phase, parts in pooled.items()}
    ratio = p99["shadow"] / p99["no rollout"]
    return {"rate_rps": rate, "segment_s": segment_s, "rounds": rounds, "segments": segments,
            "pooled_p99_ms": p99, "pooled_p50_ms": p50, "p99_ratio": round(ratio, 4),
            "p99_increase": round(ratio - 1, 4), "requests": sum(s["requests"] for s in segments if s["phase"] == "shadow"),
            "not_stable": sum(s["not_stable"] for s in segments if s["phase"] == "shadow"),
            "not_stable_all_segments": sum(s["not_stable"] for s in segments), "ended_by_judge": ended}


async def leak_probe(ctx: dict, requests: int, chunk_s: float, log=print) -> dict:
    """wrk at peak (64 connections) on fraud_shadow in shadow mode (share 1.0) until `requests` answers, every
    answer's model_version counted (`run_wrk(count_versions=True)`): a shadow answer that reached a client is a
    version other than the stable one. Runs of `chunk_s`; a shadow rollout ended meanwhile is started again."""
    from benchmarks.bodies import request_bodies
    from benchmarks.wrk import run_wrk

    model, admin, repo = "fraud_shadow", ctx["admin"], ctx["repo"]
    body_file = ctx["work"] / "leak.body"
    body_file.write_bytes(request_bodies(ctx["repo_dir"], model)["json"][0])
    url = f"{ctx['url']}/v2/models/{model}/infer"
    out = {"requests": 0, "by_version": Counter(), "non200": 0, "not_stable": 0, "chunks": [], "restarted": 0}
    while out["requests"] < requests:
        state = await admin.rollout(model)
        if state["status"] != "shadow":
            out["restarted"] += int(bool(out["chunks"]))
            version = await asyncio.to_thread(repo.publish, model, {"model.pt": ctx["file"]},
                                              {**ctx["metadata"], "gate": "accepted", "note": "leak probe"})
            await admin.wait(model, lambda s: s.get("candidate") == version and s["status"] == "shadow", 60,
                             "the shadow")
            state = await admin.rollout(model)
        stable, pairs0 = str(state["stable"]), (state.get("shadow") or {}).get("pairs") or 0
        result = await asyncio.to_thread(run_wrk, url, body_file, None, 64, 2, chunk_s, 10.0, None, True)
        after = await admin.rollout(model)
        chunk = {"stable": stable, "candidate": state.get("candidate"), "status_at_end": after["status"],
                 "requests": result.requests, "by_version": result.versions,
                 "non200": result.requests - result.statuses.get("200", 0),
                 "throughput_rps": round(result.throughput_rps, 1),
                 "shadow_pairs": ((after.get("shadow") or {}).get("pairs") or 0) - pairs0,
                 "shed": (after.get("shadow") or {}).get("shed")}
        out["chunks"].append(chunk)
        out["requests"] += chunk["requests"]
        out["non200"] += chunk["non200"]
        out["by_version"].update(result.versions)
        out["not_stable"] += sum(n for v, n in result.versions.items() if v != stable)
        log(f"  leak probe: {chunk['requests']:,} answers at {chunk['throughput_rps']:,.0f} req/s, by version "
            f"{chunk['by_version']}, stable {stable}, shadow pairs {chunk['shadow_pairs']:,}, shed {chunk['shed']}, "
            f"{out['requests']:,} in all")
    out["by_version"] = dict(out["by_version"])
    state = await admin.rollout(model)
    if state["status"] != "idle":
        try:
            await admin.act(model, "abort")
        except RuntimeError:  # decided meanwhile
            pass
    return out
