"""Baseline "the HTTP ceiling for Python": one uvicorn + Starlette process, no batching, no Ray.

Each request is decoded, validated, run through the TorchScript model and
encoded with fleet's own codec, inline on the event loop (for a model of tens
of microseconds a hop to a thread costs more than the model). Nothing a Python
HTTP server could skip is done, so its req/s is what any Python front end on
one core can reach for this model; fleet pays Ray and batching on top of it.

    python -m benchmarks.baselines.plain_http --repository R --model fraud --port P

or, managed from Python::

    with PlainHttpServer("model_repository", "fraud") as server:
        httpx.post(f"{server.url}/v2/models/fraud/infer", content=body)
"""

from __future__ import annotations

import argparse

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.baselines._model import HEADER_LENGTH, V2Model, not_found
from benchmarks.baselines._process import ManagedServer

__all__ = ["PlainHttpServer", "build_app", "main"]


def build_app(model: V2Model) -> Starlette:
    """The Starlette app: `POST /v2/models/{m}[/versions/{v}]/infer` and `GET /v2/health/ready`."""

    async def infer(request: Request) -> Response:
        params = request.path_params
        status, body, headers = model.answer(
            params["model"], params.get("version"), await request.body(), request.headers.get(HEADER_LENGTH)
        )
        return Response(body, status_code=status, headers=headers)

    async def ready(request: Request) -> Response:
        return Response(b"")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        _, body, headers = not_found(request.method, request.url.path)
        return Response(body, status_code=exc.status_code, headers=headers)

    return Starlette(
        exception_handlers={HTTPException: http_error},
        routes=[
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
        ],
    )


class PlainHttpServer(ManagedServer):
    """`python -m benchmarks.baselines.plain_http` in its own process group; `.start()`, `.url`, `.stop()`."""

    module = "benchmarks.baselines.plain_http"
    label = "plain HTTP baseline"
    start_timeout_s = 60.0
    stop_grace_s = 10.0


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.plain_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="model repository root")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    model = V2Model(args.repository, args.model, threads=args.threads)
    print(f"plain HTTP baseline: {args.model} version {model.version} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(
        build_app(model),
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
