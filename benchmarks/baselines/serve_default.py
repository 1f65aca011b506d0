"""Baseline "a default Ray Serve deployment": what Ray Serve gives with no tuning at all.

A process of its own starts a private local Ray (2 CPUs, no dashboard, its own
temp folder, so it never joins another cluster) and Serve with its defaults:
the Python proxy (`RAY_SERVE_ENABLE_HA_PROXY=0`), one replica, the default
`max_ongoing_requests`, no `@serve.batch`. The one deployment takes the
Starlette request, and decodes, validates, runs and encodes it with fleet's
codec, one request per forward pass. fleet's ingress, batcher and HAProxy are
what separate it from this.

Under more concurrent requests than `max_ongoing_requests` (5 by default) the
proxy's router backs off (25 ms doubling to 0.5 s) until the replica has room,
so at 64 connections it serves far fewer requests per second than at 4: that
is a property of the defaults, and what this baseline shows.

    python -m benchmarks.baselines.serve_default --repository R --model fraud --port P --ray-temp-dir D

prints `READY <url>` once the route answers and shuts Serve and Ray down on
SIGTERM. From Python::

    with ServeDefaultServer("model_repository", "fraud") as server:
        httpx.post(f"{server.url}/v2/models/fraud/infer", content=body)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from benchmarks.baselines._model import (
    HEADER_LENGTH,
    V2Model,
    match_infer_path,
    not_found,
)
from benchmarks.baselines._process import ManagedServer, is_ready

__all__ = ["ServeDefaultServer", "V2Deployment", "main"]

_APP_NAME = "baseline"
_ANSWER_TIMEOUT_S = 120.0


class V2Deployment:
    """The deployment's class: `serve.deployment(V2Deployment)`, one request per call."""

    def __init__(self, repository: str, model: str) -> None:
        self._model = V2Model(repository, model, threads=1)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/v2/health/ready" and request.method == "GET":
            return Response(b"")
        route = match_infer_path(path)
        if route is None or request.method != "POST":
            status, body, headers = not_found(request.method, path)
        else:
            status, body, headers = self._model.answer(*route, await request.body(), request.headers.get(HEADER_LENGTH))
        return Response(body, status_code=status, headers=headers)


class ServeDefaultServer(ManagedServer):
    """`python -m benchmarks.baselines.serve_default` in its own process group; `.start()`, `.url`, `.stop()`.

    `.ray_temp_dir` is the private Ray temp folder: every Ray process of this
    baseline names it on its command line, and `.stop()` kills any still alive.
    """

    module = "benchmarks.baselines.serve_default"
    label = "default Ray Serve baseline"
    start_timeout_s = 180.0  # Ray + Serve + one replica: ~20 s on 2 idle cores, much more when shared
    stop_grace_s = 30.0  # serve.shutdown() and ray.shutdown() take ~5-10 s

    @property
    def ray_temp_dir(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "ray"

    def _extra_args(self, workdir: Path) -> list[str]:
        return ["--ray-temp-dir", str(workdir / "ray")]

    def _env(self) -> dict[str, str]:
        # Serve's defaults, whatever the caller's environment: no other cluster, no Serve tuning.
        env = {k: v for k, v in super()._env().items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # The one departure from the defaults, for a fair fight: Ray starts workers at nice 15,
        # which hands the CPU to the load generator; fleet's workers run at nice 0 too.
        env["RAY_worker_niceness"] = "0"
        return env


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the shutdown short
    raise SystemExit(0)


def _wait_answering(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_ready(url):  # the proxy is not listening or the route not yet known
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve does not answer on {url} after {timeout_s:.0f} s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baselines.serve_default", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", required=True, help="model repository root")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ray-temp-dir", required=True, help="absolute path of a private, short Ray temp folder")
    args = parser.parse_args(argv)
    if os.environ.get("RAY_ADDRESS"):
        parser.error("RAY_ADDRESS is set: this baseline starts its own Ray, unset it")

    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, _on_sigterm)
    url = f"http://{args.host}:{args.port}"
    try:
        # No address and a private temp folder: a new local Ray, never the last `ray start` cluster.
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(Path(args.ray_temp_dir).resolve()))
        signal.signal(signal.SIGTERM, _on_sigterm)  # ray.init installs its own
        serve.start(http_options={"host": args.host, "port": args.port})
        app = serve.deployment(V2Deployment, name="v2_model").bind(str(Path(args.repository).resolve()), args.model)
        serve.run(app, name=_APP_NAME, route_prefix="/")
        _wait_answering(url, _ANSWER_TIMEOUT_S)
        print(f"READY {url}", flush=True)
        while True:
            time.sleep(3600)  # until SIGTERM raises SystemExit
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        print("stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
