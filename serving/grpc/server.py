"""The gRPC listener of an ingress replica: grpc.aio on the replica's event loop, SO_REUSEPORT.

Every ingress replica of a node binds the gRPC port (8001 by default) with SO_REUSEPORT, as the
HTTP listener does, and the kernel spreads connections over them. gRPC multiplexes every call
of a channel over one HTTP/2 connection, so a channel stays on the replica its connection
landed on (per-connection balancing): a client that wants several replicas opens several
channels.

Bounded: at most `max_concurrent_rpcs` calls at once (one more is refused RESOURCE_EXHAUSTED by
grpc), messages up to `max_message_bytes` (a larger one: RESOURCE_EXHAUSTED, before it is
handed to fleet), and a stream reads at most MAX_STREAM_PIPELINE requests ahead of its answers.
On stop the port is closed to new calls and the calls in flight get `graceful_shutdown_s` to finish.
"""

from __future__ import annotations

import logging

import grpc

from serving.auth import Guard
from serving.grpc.handlers import build_handlers
from serving.service import InferenceService

__all__ = ["GrpcListener", "make_grpc_listener", "TRANSPORTS"]

_log = logging.getLogger("fleet.grpc")

TRANSPORTS = ("native", "grpcio")


def make_grpc_listener(service: InferenceService, host: str, port: int, *, transport: str = "native",
                       **options):
    """The replica's gRPC listener: the native transport (serving/grpc/native_server.py) when asked for and
    built (and FLEET_PURE_PYTHON is not set), else grpc.aio. `options`: GrpcListener's keyword arguments."""
    if transport not in TRANSPORTS:
        raise ValueError(f"grpc transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    from serving.grpc.native_server import NativeGrpcListener, native_transport_available

    if transport == "native" and native_transport_available():
        _log.info("gRPC transport: native (native._h2, HTTP/2 on libnghttp2)")
        return NativeGrpcListener(service, host, port, **options)
    _log.info("gRPC transport: grpc.aio (%s)", "configured" if transport == "grpcio" else
              "native._h2 unavailable or FLEET_PURE_PYTHON set")
    return GrpcListener(service, host, port, **options)


class GrpcListener:
    def __init__(self, service: InferenceService, host: str, port: int, *, max_message_bytes: int,
                 max_concurrent_rpcs: int, graceful_shutdown_s: float, guard: Guard | None = None):
        self.host, self.port = host, port
        self.graceful_shutdown_s = graceful_shutdown_s
        self._generic, self._handlers = build_handlers(service, guard)
        self._options = [
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            # Keepalive pings from clients are fine, but not a flood of them.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        self._max_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None
        self._stopped = False

    async def start(self) -> None:
        server = grpc.aio.server(options=self._options, maximum_concurrent_rpcs=self._max_rpcs)
        server.add_generic_rpc_handlers((self._generic,))
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            bound = 0
        if bound != self.port:
            raise OSError(f"the gRPC port {address} is in use or cannot be bound")
        await server.start()
        self._server = server
        _log.info("serving KServe v2 gRPC on %s", address)

    def in_flight(self) -> int:
        """Calls being answered now (a stream counts each request it has read and not answered)."""
        return self._handlers.in_flight

    def alive(self) -> bool:
        return self._server is not None and not self._stopped

    async def stop(self) -> None:
        if self._server is None or self._stopped:
            return
        self._stopped = True
        await self._server.stop(self.graceful_shutdown_s)
