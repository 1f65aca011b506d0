"""A minimal callback-driven HTTP/1.1 client for the load generator: a response parser and a connection pool.

No task, future or stream per request: each connection is an `asyncio.Protocol`
whose `data_received` feeds a `ResponseParser`, and a finished response goes
straight to the pool's `on_done` callback. A generator shares the machine with
the server it measures, so what it spends per request is taken from the server.

The client sends one prebuilt request at a time per connection (no
pipelining). Responses are framed by Content-Length, chunked encoding, or the
end of the connection; 1xx interim answers are skipped; 204 and 304 have no
body. HEAD requests are not supported (their answers carry a length but no body).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

__all__ = ["CONNECT", "READ", "WRITE", "ConnectionPool", "ResponseParser", "parse_head"]

CONNECT, WRITE, READ = 1, 2, 3  # transport error kinds passed to on_done (0: a response)
_IDLE_REUSE_S = 1.0  # servers close idle keep-alive connections (uvicorn after 5 s); don't race them
_MAX_HEAD_BYTES = 1 << 16
_HEAD, _LENGTH, _CHUNK, _TRAILER, _TO_EOF = range(5)  # parser states


def parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, content length or None, chunked, keep-alive) from a status line + headers + blank line."""
    if head[:7] != b"HTTP/1." or head[8:9] != b" " or not head[9:12].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {bytes(head[:40])!r}")
    keep_alive, length, chunked = head[7:8] != b"0", None, False
    lower = head.lower()
    if (i := lower.find(b"\r\ncontent-length:")) >= 0:
        length = int(lower[i + 17:lower.find(b"\r\n", i + 17)])
        if length < 0:
            raise ValueError(f"negative Content-Length {length}")
    if (i := lower.find(b"\r\ntransfer-encoding:")) >= 0:
        chunked = b"chunked" in lower[i + 20:lower.find(b"\r\n", i + 20)]
    if (i := lower.find(b"\r\nconnection:")) >= 0:
        value = lower[i + 13:lower.find(b"\r\n", i + 13)]
        keep_alive = b"close" not in value if keep_alive else b"keep-alive" in value
    return int(head[9:12]), length, chunked, keep_alive


class ResponseParser:
    """Parses a stream of HTTP/1.1 responses fed in pieces of any size.

    Calls `on_response(status, body, keep_alive)` for each complete final
    response. `feed` and `feed_eof` raise ValueError on a malformed or cut-off
    response; the stream is then unusable.
    """

    __slots__ = ("_buf", "_chunks", "_keep_alive", "_need", "_on_response", "_state", "_status")

    def __init__(self, on_response: Callable[[int, bytes, bool], object]):
        self._on_response = on_response
        self._buf = bytearray()
        self._state = _HEAD
        self._status, self._need, self._keep_alive = 0, 0, True
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._buf:  # the rare case: a response split across reads
            self._buf += data
            del self._buf[:self._parse(self._buf)]
            return
        used = self._parse(data)  # the usual case: whole responses, no copy
        if used < len(data):
            self._buf += data[used:]

    def feed_eof(self) -> None:
        """The peer closed: completes a response framed by the connection's end; raises if one is cut off."""
        if self._state == _TO_EOF:
            body, self._buf, self._state = bytes(self._buf), bytearray(), _HEAD
            self._on_response(self._status, body, False)
        elif self._state != _HEAD or self._buf:
            raise ValueError("connection closed in the middle of a response")

    def _parse(self, buf: bytes | bytearray) -> int:
        """Emit every response complete in buf; return how many bytes were used."""
        pos, n = 0, len(buf)
        while pos < n:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > _MAX_HEAD_BYTES:
                        raise ValueError(f"response head over {_MAX_HEAD_BYTES} bytes")
                    return pos
                status, length, chunked, keep_alive = parse_head(buf[pos:end + 4])
                pos = end + 4
                if status < 200:
                    continue  # interim answer: the real one follows
                if status in (204, 304):
                    chunked, length = False, 0
                if chunked:
                    self._state, self._chunks = _CHUNK, []
                elif length is None:
                    self._state, keep_alive = _TO_EOF, False
                elif pos + length <= n:  # the usual case: the whole body is here
                    self._on_response(status, bytes(buf[pos:pos + length]), keep_alive)
                    pos += length
                    continue
                else:
                    self._state, self._need = _LENGTH, length
                self._status, self._keep_alive = status, keep_alive
            elif state == _LENGTH:
                stop = pos + self._need
                if stop > n:
                    return pos
                self._state = _HEAD
                self._on_response(self._status, bytes(buf[pos:stop]), self._keep_alive)
                pos = stop
            elif state == _CHUNK:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return pos
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError(f"negative chunk size {size}")
                if size == 0:
                    self._state, pos = _TRAILER, eol + 2
                    continue
                stop = eol + 2 + size
                if stop + 2 > n:
                    return pos
                if buf[stop:stop + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self._chunks.append(bytes(buf[eol + 2:stop]))
                pos = stop + 2
            elif state == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return pos
                if eol == pos:  # the blank line that ends the trailers
                    self._state = _HEAD
                    self._on_response(self._status, b"".join(self._chunks), self._keep_alive)
                pos = eol + 2
            else:  # _TO_EOF: everything up to the close is the body
                return pos
        return pos


class _Connection(asyncio.Protocol):
    """One connection of a pool: writes a request, parses the answer, reports to the pool."""

    __slots__ = ("key", "live", "parser", "pool", "transport", "used_at")

    def __init__(self, pool: ConnectionPool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser(self._answered)
        self.key = -1  # the request in flight, -1: none
        self.live = False  # in the pool (not yet, or no longer: events are ignored)
        self.used_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except ValueError:
            self.pool._broken(self)

    def eof_received(self) -> bool:
        try:
            self.parser.feed_eof()
        except ValueError:
            pass  # the request in flight fails in connection_lost
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._broken(self)

    def _answered(self, status: int, body: bytes, keep_alive: bool) -> None:
        key = self.key
        if key < 0:
            raise ValueError("a response with no request outstanding")
        self.key = -1
        pool = self.pool
        if keep_alive:
            pool._release(self)
        else:
            pool._drop(self)
        pool._on_done(key, status, 0)


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to host:port, at most `limit`, opened on demand.

    `send(key, request)` writes `request` (a whole HTTP/1.1 request) on an idle
    connection, else on a new one if fewer than `limit` are open or opening,
    else on the first one to free up (first come, first served). Each key sent
    ends in exactly one call `on_done(key, status, error)`: error 0 and the
    response's status, or CONNECT, WRITE or READ and status 0 - unless `cancel`
    dropped it first. A connection is reused unless its answer said
    `Connection: close`, it failed, or it sat idle over a second. Must be
    created and used inside a running event loop.
    """

    def __init__(self, host: str, port: int, limit: int, on_done: Callable[[int, int, int], object]):
        if limit < 1:
            raise ValueError(f"need a connection limit >= 1, got {limit}")
        self._loop = asyncio.get_running_loop()
        self._host, self._port, self._limit, self._on_done = host, port, limit, on_done
        self._idle: list[_Connection] = []  # most recently used last
        self._conns: set[_Connection] = set()  # live ones, idle or busy
        self._connecting: dict[int, asyncio.Task] = {}  # key -> the task opening a connection for it
        self._waiting: deque[tuple[int, bytes]] = deque()
        self._cancelled: set[int] = set()  # keys in _waiting to skip
        self._open = 0  # connections live or being opened
        self._closed = False

    def send(self, key: int, request: bytes) -> None:
        idle = self._idle
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if now - conn.used_at < _IDLE_REUSE_S:  # (a lost one has left the list already)
                    self._send_on(conn, key, request)
                    return
                self._drop(conn)
        if self._open < self._limit:
            self._open += 1
            self._connect(key, request)
        else:
            self._waiting.append((key, request))

    def cancel(self, keys: Iterable[int]) -> None:
        """Forget these keys (no on_done for them): unqueue them, stop their connects, abort their connections."""
        keys = set(keys)
        if self._waiting:
            self._cancelled |= keys
        for conn in [c for c in self._conns if c.key in keys]:
            conn.key = -1
            self._drop(conn, abort=True)
        for key in keys:
            if (task := self._connecting.pop(key, None)) is not None:
                task.cancel()

    async def aclose(self) -> None:
        """Close every connection and stop every connect in progress."""
        self._closed = True
        tasks = list(self._connecting.values())
        for task in tasks:
            task.cancel()
        for conn in self._conns:
            conn.live = False
            conn.transport.close()
        self._conns.clear()
        self._idle.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _send_on(self, conn: _Connection, key: int, request: bytes) -> None:
        conn.key = key
        try:
            conn.transport.write(request)
        except (OSError, RuntimeError):
            conn.key = -1
            self._drop(conn, abort=True)
            self._on_done(key, 0, WRITE)

    def _connect(self, key: int, request: bytes) -> None:
        self._connecting[key] = self._loop.create_task(self._open_for(key, request))

    async def _open_for(self, key: int, request: bytes) -> None:
        conn = _Connection(self)
        try:
            await self._loop.create_connection(lambda: conn, self._host, self._port)
        except OSError:
            self._connecting.pop(key, None)
            self._slot_freed()
            self._on_done(key, 0, CONNECT)
            return
        except asyncio.CancelledError:
            if conn.transport is not None:
                conn.transport.abort()
            self._slot_freed()
            raise
        self._connecting.pop(key, None)
        if conn.transport.is_closing():  # closed by the peer before it could be used
            self._slot_freed()
            self._on_done(key, 0, READ)
            return
        conn.live = True
        self._conns.add(conn)
        self._send_on(conn, key, request)

    def _next_waiting(self) -> tuple[int, bytes] | None:
        waiting, cancelled = self._waiting, self._cancelled
        while waiting:
            key, request = waiting.popleft()
            if key in cancelled:
                cancelled.discard(key)
            else:
                return key, request
        cancelled.clear()  # nothing left to skip
        return None

    def _release(self, conn: _Connection) -> None:
        """conn is free and reusable: give it to the first waiting request, or keep it idle."""
        if self._waiting and (waiting := self._next_waiting()) is not None:
            self._send_on(conn, *waiting)
        else:
            conn.used_at = time.monotonic()
            self._idle.append(conn)

    def _slot_freed(self) -> None:
        """A connection (or an attempt to open one) ended: open one for the first waiting request, if any."""
        if self._closed:
            return
        if self._waiting and (waiting := self._next_waiting()) is not None:
            self._connect(*waiting)
        else:
            self._open -= 1

    def _drop(self, conn: _Connection, abort: bool = False) -> None:
        if not conn.live:
            return
        conn.live = False
        self._conns.discard(conn)
        if abort:
            conn.transport.abort()
        else:
            conn.transport.close()
        self._slot_freed()

    def _broken(self, conn: _Connection) -> None:
        """The connection was lost or sent garbage: drop it; the request in flight, if any, failed."""
        if not conn.live:
            return
        key, conn.key = conn.key, -1
        if key < 0 and conn in self._idle:
            self._idle.remove(conn)
        self._drop(conn, abort=True)
        if key >= 0:
            self._on_done(key, 0, READ)
