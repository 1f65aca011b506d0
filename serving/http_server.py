"""fleet's own HTTP/1.1 server inside an ingress replica, on a SO_REUSEPORT socket.

Every ingress replica on a node binds the public port with SO_REUSEPORT, so the
kernel spreads incoming connections over them: no proxy hop and no per-request
wrapping by Serve. Serve still owns the replicas: it starts, health-checks,
restarts and replaces them.

The server is an asyncio protocol over `httptools` (the C parser uvicorn
uses). It reads a whole request (bounded by `max_body_bytes`: a larger
Content-Length is answered 413 before the body is read), hands it to a
`Handler` and writes the answer in one write. Keep-alive and pipelining (answers
in order), `Expect: 100-continue`, chunked request bodies, an idle timeout;
a client that disconnects has its request cancelled. Measured against uvicorn
on the same handler, it takes well under half the CPU per request (see
benchmarks/ and the README).

Memory is bounded: at most `max_connections` connections (one more is answered
503 with Retry-After and closed), each reading at most `max_body_bytes` of a
request and holding at most `_MAX_PIPELINED` requests ahead of the one being
answered (it stops reading from a client that pipelines further).

On stop (drain) it closes the listening socket (new connections go to the other
replicas; with `net.ipv4.tcp_migrate_req=1` the kernel hands the ones already
queued on this socket to them too), answers every request it has read — each
answer says `connection: close` — and closes each connection after its answer.
A connection that stays idle is closed once it has been idle for
`drain_idle_close_s` (a client sending on it at that moment would see it
closed, so they get that long to send first), everything by the grace period.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import http
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import unquote

import httptools

from serving.limits import over_limit

__all__ = ["HttpRequest", "HttpResponse", "Handler", "HttpListener", "reuseport_socket", "port_is_free"]

_log = logging.getLogger("fleet.http_server")


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str  # percent-decoded
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    body: bytes
    client: tuple[str, int] | None = None


HttpResponse = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_MAX_PIPELINED = 16  # requests read ahead of the one being answered, per connection
_ERROR_TYPE = (b"content-type", b"application/json")


def reuseport_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket that other replicas of this user may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on (host, port): checked before a cluster claims it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def encode_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool,
                    head: bool = False) -> bytes:
    """The bytes of one HTTP/1.1 answer (Content-Length framing)."""
    lines = [b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n" % (status, _REASONS.get(status, b""), len(body))]
    for key, value in headers:
        if key != b"content-length":
            lines.append(key + b": " + value + b"\r\n")
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(body)
    return b"".join(lines)


def _error(status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> bytes:
    body = b'{"error":"%s"}' % message.replace('"', "'").encode()
    return encode_response(status, [_ERROR_TYPE, *headers], body, keep_alive=False)


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, server: "HttpListener"):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = None
        self.pending: collections.deque[tuple[HttpRequest, bool]] = collections.deque()
        self.task: asyncio.Task | None = None  # the request being answered
        self.closing = False
        self._idle = None
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._skip = False  # answered already (413): ignore the rest of this request
        self.idle_since = 0.0  # loop time of the last answer (drain closes connections idle this long)

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.client = transport.get_extra_info("peername")
        self.idle_since = self.loop.time()
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.refused_connections += 1
            self._fail(503, f"this replica has {len(server.connections)} connections open (max_connections "
                       f"{server.max_connections}); retry", [(b"retry-after", b"1")])
            return
        server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc):
        self.closing = True
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client is gone: drop its queued work
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # -- httptools callbacks ------------------------------------------------------
    def on_message_begin(self):
        self._url, self._headers, self._body, self._size, self._skip = b"", [], [], 0, False

    def on_url(self, url: bytes):
        self._url += url

    def on_header(self, name: bytes, value: bytes):
        self._headers.append((name.lower(), value))

    def on_headers_complete(self):
        limit = self.server.max_body_bytes
        for key, value in self._headers:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                self._fail(413, over_limit(f"request body of {int(value)} bytes", limit, "max_request_bytes", " bytes"))
                self._skip = True
                return
            if key == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        if self._skip:
            return
        self._size += len(body)
        if self._size > self.server.max_body_bytes:
            self._fail(413, over_limit("request body", self.server.max_body_bytes, "max_request_bytes", " bytes"))
            self._skip = True
            return
        self._body.append(body)

    def on_message_complete(self):
        if self._skip or self.closing:
            return
        try:
            url = httptools.parse_url(self._url)
            path = unquote(url.path.decode("latin-1"))
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self._fail(400, "malformed request URL")
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = HttpRequest(self.parser.get_method().decode("latin-1"), path, url.query or b"",
                              self._headers, body, self.client)
        self.pending.append((request, self.parser.should_keep_alive()))
        if self.task is None:
            self._next()
        elif len(self.pending) > _MAX_PIPELINED:
            self.transport.pause_reading()  # a client pipelining far ahead waits

    # -- answering --------------------------------------------------------------
    def _next(self) -> None:
        if not self.pending or self.closing:
            self.task = None
            if not self.closing:
                self._arm_idle()
            return
        request, keep_alive = self.pending.popleft()
        self.task = self.loop.create_task(self._answer(request, keep_alive))

    async def _answer(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            status, headers, body = await self.server.handler(request)
        except asyncio.CancelledError:
            return
        except Exception:  # noqa: BLE001 - the handler answers its own errors; this is a bug
            _log.exception("unhandled error answering %s %s", request.method, request.path)
            status, headers, body = 500, [_ERROR_TYPE], b'{"error":"internal error"}'
        if self.closing:
            return
        keep_alive = keep_alive and not self.server.stopping
        self.transport.write(encode_response(status, headers, body, keep_alive, request.method == "HEAD"))
        self.idle_since = self.loop.time()
        if not keep_alive:
            self._close()
            return
        if len(self.pending) <= _MAX_PIPELINED:
            self.transport.resume_reading()
        self._next()

    def _fail(self, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(_error(status, message, headers))
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is None:
            self._idle = self.loop.call_later(self.server.keep_alive_s, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        if self.task is None and not self.pending:
            self._close()

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.pending)


class HttpListener:
    """Serve `handler` on (host, port) from the running event loop."""

    def __init__(self, handler: Handler, host: str, port: int, *, max_body_bytes: int = 64 << 20,
                 graceful_shutdown_s: float = 10.0, keep_alive_s: float = 75.0, max_connections: int = 4096,
                 drain_idle_close_s: float = 1.0):
        self.handler = handler
        self.host, self.port = host, port
        self.max_body_bytes = max_body_bytes
        self.graceful_shutdown_s = graceful_shutdown_s
        self.keep_alive_s = keep_alive_s
        self.max_connections = max_connections
        self.drain_idle_close_s = drain_idle_close_s
        self.refused_connections = 0  # answered 503 at max_connections
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        sock = reuseport_socket(self.host, self.port)
        self._server = await self.loop.create_server(lambda: _Connection(self), sock=sock)
        _log.info("listening on %s:%d", self.host, self.port)

    def alive(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def in_flight(self) -> int:
        """Requests read and not yet answered (being answered, or pipelined behind one): the autoscaling load."""
        return sum(len(c.pending) + (c.task is not None) for c in self.connections)

    async def stop(self) -> None:
        """Drain: stop accepting, answer what was read (closing each connection after its answer),
        close connections idle for `drain_idle_close_s`, and by the grace period everything."""
        if self._server is None:
            return
        self.stopping = True
        self._server.close()
        started = self.loop.time()
        deadline = started + self.graceful_shutdown_s
        _log.info("draining %s:%d: %d connections, %d requests in flight (up to %.1f s)", self.host, self.port,
                  len(self.connections), self.in_flight(), self.graceful_shutdown_s, extra={"event": "drain"})
        while self.connections and self.loop.time() < deadline:
            now = self.loop.time()
            for conn in list(self.connections):
                if not conn.busy and now - conn.idle_since >= self.drain_idle_close_s:
                    conn._close()
            await asyncio.sleep(0.02)
        left = len(self.connections)
        for conn in list(self.connections):
            conn._close()
        self._server = None
        _log.info("drained %s:%d in %.2f s (%d connections closed at the deadline)", self.host, self.port,
                  self.loop.time() - started, left, extra={"event": "drain"})
