"""What `fleet status` and the start-up banner show, read over HTTP from the running cluster."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["describe_cluster", "curl_example", "ray_token", "client_key"]

_EXAMPLE_VALUES = {"BOOL": False, "BYTES": "x"}


def ray_token() -> str | None:
    """Ray's token for its dashboard API (token authentication is on for local clusters)."""
    try:
        return (Path.home() / ".ray" / "auth_token").read_text().strip() or None
    except OSError:
        return None


def client_key() -> str | None:
    """The API key `fleet status` and the banner send to a cluster that requires one (env FLEET_API_KEY)."""
    return os.environ.get("FLEET_API_KEY") or None


def _get(url: str, *, method: str = "GET", token: str | None = None, timeout_s: float = 5.0):
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read() or b"null")


def _replicas(dashboard_url: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(running replicas per deployment, {node address: {deployment: running replicas}}) of fleet's application,
    from the Ray dashboard's Serve API."""
    from serving.app import APP_NAME

    try:  # the dashboard's Serve API can take over 5 s on a loaded machine
        doc = _get(f"{dashboard_url}/api/serve/applications/", token=ray_token(), timeout_s=20.0)
    except (urllib.error.URLError, OSError, ValueError):
        return {}, {}
    out: dict[str, int] = {}
    nodes: dict[str, dict[str, int]] = {}
    app = (doc.get("applications") or {}).get(APP_NAME) or {}
    for name, dep in (app.get("deployments") or {}).items():
        running = [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]
        out[name] = len(running)
        for r in running:
            where = nodes.setdefault(r.get("node_ip") or r.get("node_id") or "?", {})
            where[name] = where.get(name, 0) + 1
    return out, nodes


def describe_cluster(state: dict) -> dict:
    """Models, versions, readiness and replica counts of the cluster in `state`."""
    url = state["url"]
    replicas, nodes = _replicas(state["dashboard_url"])
    info = {
        "url": url,
        "dashboard_url": state["dashboard_url"],
        "repository": state.get("repository"),
        "status": "unreachable",
        "models": [],
        "ingress_replicas": replicas.get("ingress", 0),
        "nodes": nodes,  # node address -> replicas of each deployment running there
        "attached": bool(state.get("attached")),  # deployed into a Ray cluster fleet did not start
    }
    try:
        index = _get(f"{url}/v2/repository/index", method="POST", token=client_key())
        info["status"] = "ready" if all(e.get("state") == "READY" for e in index) else "degraded"
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            info["status"] = "requires an API key (set FLEET_API_KEY to one)"
        return info
    except (urllib.error.URLError, OSError, ValueError):
        return info
    models: dict[str, dict] = {}
    for entry in index:
        worker = f"worker-{entry['name']}"
        m = models.setdefault(entry["name"], {"name": entry["name"], "versions": [], "state": entry["state"],
                                              "placement": "split" if worker in replicas else "colocated",
                                              "replicas": replicas.get(worker, 0)})
        if "version" in entry:
            m["versions"].append(entry["version"])
        if entry["state"] != "READY":
            m["state"] = entry["state"]
    info["models"] = list(models.values())
    return info


def curl_example(url: str) -> str | None:
    """A ready-to-paste curl infer request (zeros as data) for the first served model of fixed input shapes."""
    key = client_key()
    try:
        index = _get(f"{url}/v2/repository/index", method="POST", token=key)
        if not index:
            return None
        meta = None
        for name in dict.fromkeys(entry["name"] for entry in index):
            meta = _get(f"{url}/v2/models/{name}", token=key)
            if all(d != -1 for t in meta["inputs"] for d in t["shape"][1:]):
                break
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None
    inputs = []
    for t in meta["inputs"]:
        shape = [1 if d == -1 else d for d in t["shape"]]
        count = 1
        for d in shape:
            count *= d
        value = _EXAMPLE_VALUES.get(t["datatype"], 0)
        inputs.append({"name": t["name"], "shape": shape, "datatype": t["datatype"], "data": [value] * count})
    body = json.dumps({"inputs": inputs}, separators=(",", ":"))
    auth = " -H \"Authorization: Bearer $FLEET_API_KEY\"" if key else ""
    return f"curl -s -X POST {url}/v2/models/{name}/infer -H 'Content-Type: application/json'{auth} -d '{body}'"
