"""The gRPC listener on fleet's native transport (`native._h2`): HTTP/2 and gRPC framing in C++.

grpc.aio caps a replica at a few thousand calls a second (its own machinery per call), below fleet's
HTTP path. Here `native._h2` (libnghttp2) owns the sockets and the HTTP/2 sessions, in an epoll set
this event loop watches: when it is readable, one `poll` reads what is ready and a unary call comes
out as one event (path, metadata, its message, peer, deadline); an answer is written to its socket
when the call returns, with no further turn of the loop. Like the HTTP listener, no request or answer
crosses a thread. The RPCs are the same functions grpc.aio serves
(serving/grpc/handlers.py), called with `_Context`: the part of grpc.aio's ServicerContext they use.

The same interface and bounds as `GrpcListener` (serving/grpc/server.py): SO_REUSEPORT, messages up to
`max_message_bytes` (a larger one is refused RESOURCE_EXHAUSTED by the transport before it is read),
at most `max_concurrent_rpcs` calls at once (SETTINGS_MAX_CONCURRENT_STREAMS per connection, and the
replica's calls in all: one more is RESOURCE_EXHAUSTED), at most `max_connections` connections. A call
the client cancels (RST_STREAM, or its connection closing) cancels its task. On stop the port closes,
clients get GOAWAY, and the calls in flight get `graceful_shutdown_s` to finish.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time

import grpc

from native import H2
from serving.auth import Guard
from serving.grpc.handlers import SERVICE, rpc_functions
from serving.grpc.status import error_status
from serving.service import InferenceService

__all__ = ["NativeGrpcListener", "native_transport_available"]

_log = logging.getLogger("fleet.grpc")

_CODE = {code: code.value[0] for code in grpc.StatusCode}
_OK, _CANCELLED, _DEADLINE, _UNIMPLEMENTED, _EXHAUSTED = 0, 1, 4, 12, 8
_STREAM_PATH = f"/{SERVICE}/ModelStreamInfer"


def native_transport_available() -> bool:
    """Whether `native._h2` is built and allowed (not FLEET_PURE_PYTHON=1)."""
    return H2 is not None


class _Abort(Exception):
    """`context.abort(code, details)`: ends the call with that status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """What serving/grpc/handlers.py uses of grpc.aio's ServicerContext, for one call."""

    __slots__ = ("raw_metadata", "_metadata", "_peer", "_deadline", "trailers", "cancelled", "_listener", "_call")

    def __init__(self, listener: NativeGrpcListener, call: int, metadata: list, peer: str, deadline: float | None):
        self._listener, self._call = listener, call
        self.raw_metadata = metadata  # [(name, value)] bytes, as the HTTP guard reads headers
        self._metadata = None
        self._peer, self._deadline = peer, deadline
        self.trailers: tuple = ()
        self.cancelled = False

    def invocation_metadata(self) -> tuple:
        md = self._metadata
        if md is None:
            md = self._metadata = tuple(_metadatum(k, v) for k, v in self.raw_metadata)
        return md

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata) -> None:
        self.trailers = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)

    async def write(self, message: bytes) -> None:
        self._listener._reply(self._call, message, False, _OK, None, None)


def _metadatum(key: bytes, value: bytes) -> tuple[str, str | bytes]:
    """grpc's view of a metadata entry: str values, bytes (base64-decoded) for `-bin` keys."""
    name = key.decode("latin-1")
    if not name.endswith("-bin"):
        return name, value.decode("latin-1")
    try:
        return name, base64.b64decode(value + b"=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return name, value


class _Requests:
    """A stream's request messages as the async iterator ModelStreamInfer reads; each one read reopens the
    stream's receive window by its size (the transport holds at most a window's worth unread)."""

    def __init__(self, server, call: int):
        self._server, self._call = server, call
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        data, nbytes = item
        self._server.consume(self._call, nbytes)
        return data


class NativeGrpcListener:
    """`GrpcListener`'s interface (start, stop, alive, in_flight) on the native transport."""

    def __init__(self, service: InferenceService, host: str, port: int, *, max_message_bytes: int,
                 max_concurrent_rpcs: int, graceful_shutdown_s: float, guard: Guard | None = None,
                 max_connections: int | None = None):
        if H2 is None:
            raise RuntimeError("the native gRPC transport (native._h2) is not available")
        self.host, self.port = host, port
        self.graceful_shutdown_s = graceful_shutdown_s
        unary, self._stream_rpc, self._handlers = rpc_functions(service, guard)
        self._unary = {f"/{SERVICE}/{name}": fn for name, fn in unary.items()}
        self._max_rpcs = max(1, max_concurrent_rpcs)
        self._server = H2.Server(host, port, max_message_bytes, self._max_rpcs,
                                 max_connections or self._max_rpcs, [_STREAM_PATH])
        self._calls: dict[int, tuple[asyncio.Task, _Context]] = {}
        self._streams: dict[int, _Requests] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None
        self._stopped = False

    async def start(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self._server.start()
        except OSError as exc:
            raise OSError(f"the gRPC port {address} is in use or cannot be bound ({exc})") from None
        self.port = self._server.port
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._loop.add_reader(self._server.fileno(), self._on_events)
        _log.info("serving KServe v2 gRPC on %s (native transport)", address)

    def in_flight(self) -> int:
        """Calls being answered now (a stream counts each request it has read and not answered)."""
        return self._handlers.in_flight

    def alive(self) -> bool:
        return self._loop is not None and not self._stopped and self._server.running

    def stats(self) -> dict:
        """The transport's counters: connections accepted/refused/failed/open, calls refused/cancelled, ..."""
        return self._server.stats()

    async def stop(self) -> None:
        if self._loop is None or self._stopped:
            return
        self._stopped = True
        self._server.stop(self.graceful_shutdown_s)
        # It stops at a poll once the calls in flight have ended; this one closes what is left at the deadline.
        deadline = self._loop.call_later(self.graceful_shutdown_s + 0.01, self._on_events)
        try:
            await asyncio.wait_for(asyncio.shield(self._done), self.graceful_shutdown_s + 5.0)
        except asyncio.TimeoutError:
            _log.error("the native gRPC transport did not stop within %.1f s", self.graceful_shutdown_s + 5.0)
        deadline.cancel()
        self._loop.remove_reader(self._server.fileno())
        for task, _ in list(self._calls.values()):  # their connections are gone
            task.cancel()

    # -- events from the transport ---------------------------------------------
    def _on_events(self) -> None:
        loop = self._loop
        calls = self._calls
        for event in self._server.poll():
            kind = event[0]
            if kind == 0:  # UNARY: (0, call, path, metadata, message, peer, deadline)
                _, call, path, metadata, message, peer, deadline = event
                fn = self._unary.get(path)
                if fn is None:
                    self._reply(call, None, True, _UNIMPLEMENTED, f"Method not found: {path}", None)
                elif len(calls) >= self._max_rpcs:
                    self._reply(call, None, True, _EXHAUSTED, "Concurrent RPC limit exceeded!", None)
                else:
                    ctx = _Context(self, call, metadata, peer, deadline)
                    calls[call] = (loop.create_task(self._unary_call(fn, ctx, call, message)), ctx)
            elif kind == 2:  # STREAM_MESSAGE: (2, call, message, wire bytes)
                requests = self._streams.get(event[1])
                if requests is not None:
                    requests.put((event[2], event[3]))
            elif kind == 1:  # STREAM_START: (1, call, path, metadata, None, peer, deadline)
                _, call, path, metadata, _, peer, deadline = event
                if len(calls) >= self._max_rpcs:
                    self._reply(call, None, True, _EXHAUSTED, "Concurrent RPC limit exceeded!", None)
                    continue
                ctx = _Context(self, call, metadata, peer, deadline)
                requests = self._streams[call] = _Requests(self._server, call)
                calls[call] = (loop.create_task(self._stream_call(ctx, call, requests)), ctx)
            elif kind == 3:  # STREAM_END
                requests = self._streams.get(event[1])
                if requests is not None:
                    requests.put(None)
            elif kind == 4:  # CANCEL: the client reset the call or its connection went
                # (popped here: a task cancelled before its first step never runs its `finally`)
                entry = calls.pop(event[1], None)
                self._streams.pop(event[1], None)
                if entry is not None:
                    entry[1].cancelled = True
                    entry[0].cancel()
            elif kind == 5:  # STOPPED
                if self._done is not None and not self._done.done():
                    self._done.set_result(None)
                if not self._stopped:
                    _log.error("the native gRPC transport stopped (its epoll set failed)")
                    self._stopped = True

    def _reply(self, call: int, data: bytes | None, end: bool, status: int, details: str | None, trailers) -> None:
        """Sends an answer now (its connection's socket is written before this returns)."""
        self._server.send(call, data, end, status, details, trailers)

    @staticmethod
    def _failed(exc: Exception, ctx: _Context) -> tuple[int, str, tuple]:
        """(status, details, trailers) of an RPC that raised: `context.abort`'s status, anything else logged with
        an id and answered INTERNAL with that id (serving/grpc/status.py)."""
        if isinstance(exc, _Abort):
            return _CODE[exc.code], exc.details, ctx.trailers
        code, details, trailers = error_status(exc)
        return _CODE[code], details, trailers

    def _when(self, ctx: _Context) -> float:
        return self._loop.time() + (ctx._deadline - time.monotonic())

    async def _unary_call(self, fn, ctx: _Context, call: int, message: bytes) -> None:
        try:
            if ctx._deadline is None:
                result = await fn(message, ctx)
            else:
                async with asyncio.timeout_at(self._when(ctx)):
                    result = await fn(message, ctx)
            self._reply(call, result, True, _OK, None, ctx.trailers)
        except TimeoutError:
            self._reply(call, None, True, _DEADLINE, "Deadline Exceeded", ctx.trailers)
        except asyncio.CancelledError:
            if not ctx.cancelled:  # by the client: nobody to answer; else the listener is stopping
                raise
        except Exception as exc:  # noqa: BLE001 - every failure is a status
            self._reply(call, None, True, *self._failed(exc, ctx))
        finally:
            self._calls.pop(call, None)

    async def _stream_call(self, ctx: _Context, call: int, requests: _Requests) -> None:
        try:
            if ctx._deadline is None:
                await self._stream_rpc(requests, ctx)
            else:
                async with asyncio.timeout_at(self._when(ctx)):
                    await self._stream_rpc(requests, ctx)
            self._reply(call, None, True, _OK, None, ctx.trailers)
        except TimeoutError:
            self._reply(call, None, True, _DEADLINE, "Deadline Exceeded", ctx.trailers)
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise
        except Exception as exc:  # noqa: BLE001
            self._reply(call, None, True, *self._failed(exc, ctx))
        finally:
            self._calls.pop(call, None)
            self._streams.pop(call, None)
