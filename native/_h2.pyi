"""fleet's native gRPC transport: HTTP/2 (libnghttp2, h2c with prior knowledge) and gRPC's message framing, driven by
the caller's event loop: `fileno()` is an epoll descriptor to watch (`loop.add_reader`); when it is readable, `poll()`
reads, accepts and writes what is ready and returns the events; `send` writes an answer at once. Call it from
one thread (the loop's). Events are tuples:

- (UNARY, call, path, metadata, message, peer, deadline): a whole unary call (headers, its one message, the end);
- (STREAM_START, call, path, metadata, None, peer, deadline): a streaming call's headers;
- (STREAM_MESSAGE, call, message, wire_bytes): one message of a stream (`consume(call, wire_bytes)` once read);
- (STREAM_END, call): the client half-closed its stream;
- (CANCEL, call): the client reset the call or its connection went: it takes no answer;
- (STOPPED,): the server has stopped (after `stop`), every connection closed.

metadata: [(name, value)] as bytes; peer: "ipv4:1.2.3.4:5" or "ipv6:[::1]:5"; deadline: time.monotonic()
seconds from grpc-timeout, or None.
"""

UNARY: int
STREAM_START: int
STREAM_MESSAGE: int
STREAM_END: int
CANCEL: int
STOPPED: int

class Server:
    def __init__(self, host: str, port: int, max_message_bytes: int, max_concurrent_streams: int,
                 max_connections: int, stream_paths: list[str]) -> None: ...
    def start(self) -> None: ...
    @property
    def port(self) -> int: ...
    def fileno(self) -> int: ...
    def poll(self) -> list[tuple]: ...
    def send(self, call: int, data: bytes | None, end: bool, status: int = 0, details: str | None = None,
             trailers: list[tuple[str, str]] | None = None) -> None: ...
    def consume(self, call: int, nbytes: int) -> None: ...
    def stop(self, grace_s: float) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...
