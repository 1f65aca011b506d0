"""What the rollout tests share: concurrent traffic with ids or routing keys, the admin rollout routes."""

from __future__ import annotations

import asyncio
import time

import httpx

from integration._monitoring import fraud_rows

__all__ = ["traffic", "rollout", "act", "wait_rollout", "ADMIN", "ROWS"]

ADMIN = {"authorization": "Bearer rollout-admin-token"}  # conftest.ADMIN_TOKEN
ROWS, _ = fraud_rows(512, seed=77)  # request i sends row i % 512


async def _traffic(base_url: str, model: str, names: list[str], concurrency: int, by_header: bool) -> list[dict]:
    queue = list(enumerate(names))
    answers: list[dict | None] = [None] * len(names)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while queue:
                i, name = queue.pop()
                row = ROWS[i % len(ROWS)]
                body: dict = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                          "data": row.tolist()}]}
                headers = {"fleet-routing-key": name} if by_header else None
                if not by_header:
                    body["id"] = name
                r = await client.post(f"{base_url}/v2/models/{model}/infer", json=body, headers=headers)
                doc = r.json()
                answers[i] = {"name": name, "status": r.status_code, "version": doc.get("model_version"),
                              "output": doc["outputs"][0]["data"][0] if r.status_code == 200 else None,
                              "error": doc.get("error"), "row": i % len(ROWS)}

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


def traffic(base_url: str, model: str, names: list[str], *, concurrency: int = 8, by_header: bool = False) -> list[dict]:
    """One single-row request per name (its v2 id, or its `fleet-routing-key` header with `by_header`),
    `concurrency` at a time over as many connections (spread over the ingress replicas)."""
    return asyncio.run(_traffic(base_url, model, names, concurrency, by_header))


def rollout(base_url: str, model: str) -> dict:
    r = httpx.get(f"{base_url}/v2/models/{model}/rollout", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def act(base_url: str, model: str, action: str, body: dict | None = None, headers: dict | None = ADMIN):
    return httpx.post(f"{base_url}/v2/models/{model}/rollout/{action}", json=body or {}, headers=headers, timeout=60)


def wait_rollout(base_url: str, model: str, check, timeout_s: float, what: str, load=None) -> dict:
    """Poll the rollout until `check(state)`; `load()` (sending traffic) runs between polls when given."""
    deadline = time.monotonic() + timeout_s
    state = rollout(base_url, model)
    while not check(state):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s; rollout: "
                                 f"{ {k: state.get(k) for k in ('status', 'stable', 'candidate', 'stage', 'weight')} } "
                                 f"evidence: {state.get('evidence', {}).get('reason')}")
        if load is not None:
            load()
        else:
            time.sleep(0.25)
        state = rollout(base_url, model)
    return state


