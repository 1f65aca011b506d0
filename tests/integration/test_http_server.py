"""fleet's own HTTP/1.1 server (serving/http_server.py) over real sockets, with a handler in this process."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cluster.ports import free_port
from serving.http_server import HttpListener, HttpRequest, port_is_free

pytestmark = pytest.mark.integration


class Recorder:
    """Echoes the request; `/slow` sleeps first, `/boom` raises; remembers what it saw."""

    def __init__(self):
        self.seen: list[HttpRequest] = []
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, request: HttpRequest):
        self.seen.append(request)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/slow":
            try:
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.finished += 1
        body = b"%s %s %d:" % (request.method.encode(), request.path.encode(), len(request.body)) + request.body
        return 200, [(b"content-type", b"text/plain"), (b"x-query", request.query)], body


@pytest.fixture
async def server():
    handler = Recorder()
    listener = HttpListener(handler, "127.0.0.1", free_port(), max_body_bytes=1000, keep_alive_s=2.0,
                            graceful_shutdown_s=2.0)
    await listener.start()
    yield listener, handler
    await listener.stop()


async def _exchange(port: int, data: bytes, *, until: int = 1, timeout: float = 3.0) -> bytes:
    """Send raw bytes; read until `until` complete responses arrived or the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while out.count(b"HTTP/1.1 2") + out.count(b"HTTP/1.1 4") + out.count(b"HTTP/1.1 5") < until or \
                not _complete(out):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            out += chunk
    finally:
        writer.close()
    return out


def _complete(data: bytes) -> bool:
    head, sep, body = data.rpartition(b"\r\n\r\n")
    if not sep:
        return False
    last_head = data[data.rfind(b"HTTP/1.1 "):]
    for line in last_head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
            start = last_head.index(b"\r\n\r\n") + 4
            return len(last_head) - start >= length
    return True


async def test_keep_alive_and_pipelined_requests_are_answered_in_order_on_one_connection(server):
    listener, handler = server
    requests = b"".join(
        b"POST /r%d?k=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab%d" % (i, i, i) for i in range(5)
    )
    out = await _exchange(listener.port, requests, until=5)
    bodies = [part for part in out.split(b"HTTP/1.1 200 OK") if part]
    assert len(bodies) == 5
    for i, part in enumerate(bodies):
        assert part.endswith(b"POST /r%d 3:ab%d" % (i, i)), part
        assert b"x-query: k=%d" % i in part
    assert b"connection: close" not in out


async def test_chunked_body_percent_encoded_path_and_head_request(server):
    listener, _ = server
    chunked = (b"POST /a%20b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    out = await _exchange(listener.port, chunked)
    assert out.endswith(b"POST /a b 5:abcde")
    head = await _exchange(listener.port, b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 10" in head and head.endswith(b"\r\n\r\n")


async def test_expect_100_continue_gets_an_interim_answer(server):
    listener, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"data")
    answer = await asyncio.wait_for(reader.read(4096), 3)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"POST /c 4:data")


async def test_a_body_over_the_limit_is_refused_413_before_it_is_read(server):
    listener, handler = server
    out = await _exchange(listener.port, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b"over the limit of 1000 bytes" in out
    assert b"connection: close" in out
    chunked = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n"
    out = await _exchange(listener.port, chunked)
    assert out.startswith(b"HTTP/1.1 413")
    assert not any(r.path == "/big" for r in handler.seen)


@pytest.mark.parametrize("garbage", [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
                                     b"GET / HTTP/1.1\r\nContent-Length: -4\r\n\r\n"])
async def test_malformed_requests_get_400_with_a_json_error_and_the_server_keeps_serving(server, garbage):
    listener, _ = server
    out = await _exchange(listener.port, garbage)
    assert out.startswith(b"HTTP/1.1 400") and b'"error"' in out
    ok = await _exchange(listener.port, b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


async def test_a_handler_bug_is_a_500_and_the_connection_survives(server):
    listener, _ = server
    out = await _exchange(listener.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n",
                          until=2)
    assert out.startswith(b"HTTP/1.1 500") and out.endswith(b"GET /after 0:")


async def test_http_1_0_and_connection_close_are_honoured(server):
    listener, _ = server
    out = await _exchange(listener.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"connection: close" in out
    out = await _exchange(listener.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out


async def test_a_client_that_disconnects_has_its_request_cancelled(server):
    listener, handler = server
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.2)
    assert handler.cancelled == 1 and handler.finished == 0


async def test_idle_keep_alive_connections_are_closed_after_the_timeout(server):
    listener, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(10), 5) == b""  # closed by the server, no request sent
    assert 1.5 < asyncio.get_running_loop().time() - started < 4
    writer.close()


async def test_stop_finishes_requests_in_flight_and_refuses_new_connections():
    handler = Recorder()
    listener = HttpListener(handler, "127.0.0.1", free_port(), graceful_shutdown_s=3.0)
    await listener.start()
    in_flight = asyncio.create_task(_exchange(listener.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
    await asyncio.sleep(0.1)
    await listener.stop()
    answer = await in_flight
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer
    assert handler.finished == 1
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", listener.port)


async def test_replicas_share_the_port_and_a_foreign_listener_is_detected():
    port = free_port()
    assert port_is_free("127.0.0.1", port)
    first, second = Recorder(), Recorder()
    a = HttpListener(first, "127.0.0.1", port)
    b = HttpListener(second, "127.0.0.1", port)
    await a.start()
    await b.start()  # SO_REUSEPORT: a second replica binds the same port
    try:
        assert not port_is_free("127.0.0.1", port)
        for i in range(40):  # the kernel spreads new connections over both
            await _exchange(port, b"GET /n%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
        assert first.seen and second.seen and len(first.seen) + len(second.seen) == 40
    finally:
        await a.stop()
        await b.stop()
    with socket.socket() as plain:  # an ordinary (non-reuseport) listener blocks the check
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        plain.bind(("127.0.0.1", port))
        plain.listen()
        assert not port_is_free("127.0.0.1", port)


async def test_a_connection_past_max_connections_is_answered_503_with_retry_after():
    listener = HttpListener(Recorder(), "127.0.0.1", free_port(), max_connections=2)
    await listener.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        answer = await _exchange(listener.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer
        assert b"max_connections 2" in answer and listener.refused_connections == 1
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        assert (await _exchange(listener.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await listener.stop()


async def test_drain_answers_a_request_sent_on_an_idle_keep_alive_connection_then_closes_it():
    """A client that sends on its kept-alive connection while the replica drains gets its answer
    (with connection: close), not a reset."""
    listener = HttpListener(Recorder(), "127.0.0.1", free_port(), graceful_shutdown_s=5.0, drain_idle_close_s=1.0)
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await reader.readuntil(b":")
    assert first.startswith(b"HTTP/1.1 200")
    await reader.read(65536)
    stopping = asyncio.create_task(listener.stop())
    await asyncio.sleep(0.3)  # draining; this connection is idle, within its idle allowance
    writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(65536), 3)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer and answer.endswith(b"GET /b 0:")
    assert await reader.read(10) == b""  # then closed
    await stopping
    writer.close()


async def test_continuous_load_across_one_of_two_replicas_draining_loses_nothing():
    """Two listeners share the port as two ingress replicas do; one drains while 8 clients keep
    sending on keep-alive connections and reconnecting when told to close. Every request is answered."""
    port = free_port()
    a = HttpListener(Recorder(), "127.0.0.1", port, graceful_shutdown_s=5.0)
    b = HttpListener(Recorder(), "127.0.0.1", port, graceful_shutdown_s=5.0)
    await a.start()
    await b.start()
    stop_load = asyncio.Event()
    failures: list[str] = []
    answered = 0

    async def client(i: int) -> None:
        nonlocal answered
        reader = writer = None
        while not stop_load.is_set():
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader = writer = None
                continue
            answered += 1
            if b"connection: close" in head:
                writer.close()
                reader = writer = None
            await asyncio.sleep(0.002)
        if writer is not None:
            writer.close()

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    await asyncio.sleep(0.5)
    await a.stop()
    before = answered
    await asyncio.sleep(0.5)
    stop_load.set()
    await asyncio.gather(*clients)
    await b.stop()
    assert failures == []
    assert answered > before > 50  # the load went on through the other replica
