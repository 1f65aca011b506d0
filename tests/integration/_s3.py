"""A real S3-compatible server on loopback for the tests: moto's server (`moto[server]`), one per session.

    def test_x(s3_server):                     # the session fixture of tests/integration/conftest.py
        uri = s3_server.uri("some/prefix")     # s3://fleet-test/some/prefix?endpoint_override=...&scheme=http
        before = s3_server.mark()
        ...                                    # anything that talks to S3 through pyarrow.fs
        requests = s3_server.requests_since(before)   # [(method, path), ...] as the server logged them

The server runs as a subprocess on 127.0.0.1 on a port from `cluster.ports` (chosen again
when another process took it before moto bound it). Its werkzeug access log, one line per
request on stderr, is the count the polling-cost tests assert on: `mark()` sends a request of
its own and waits until the server logged it, so every request a client got its answer to
before is in the log before the mark (werkzeug logs a request before it sends the response).
Credentials are dummy values in this process's environment only (moto accepts any).
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.ports import with_free_ports

__all__ = ["S3Server", "serve_s3", "BUCKET"]

BUCKET = "fleet-test"
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]')
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours the status of some lines
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    """moto_server on 127.0.0.1 with its access log in `log_path`."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._marks = 0

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        return with_free_ports(1, lambda ports: self._start(ports[0], timeout_s))

    def _start(self, port: int, timeout_s: float) -> "S3Server":
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = self.log_path.read_text(errors="replace")
                if "address already in use" in text.lower():
                    raise OSError(errno.EADDRINUSE, f"port {port} taken before moto_server bound it")
                raise RuntimeError(f"moto_server exited with {self.process.returncode}: {text[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            except urllib.error.HTTPError:
                pass  # it answers
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
                continue
            if not any(path == "/moto-api/" for _, path in self._lines()):  # another process's server answered
                self.stop()
                raise OSError(errno.EADDRINUSE, f"port {port} is another server's")
            self.port = port
            return self
        self.stop()
        raise RuntimeError(f"moto_server did not answer on port {port} within {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, prefix: str, bucket: str = BUCKET) -> str:
        """An s3:// URI of `prefix` in `bucket` on this server, as fleet takes a repository or data_dir."""
        return f"s3://{bucket}/{prefix.strip('/')}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                                 allow_bucket_creation=True)

    # -- counting requests ------------------------------------------------------------------
    def _lines(self) -> list[tuple[str, str]]:
        text = _COLOUR.sub("", self.log_path.read_text(errors="replace"))
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]

    def mark(self, timeout_s: float = 10.0) -> int:
        """Log a marker request and wait until it is logged; returns a handle for `requests_since`."""
        self._marks += 1
        path = f"/fleet-mark-{self._marks}"
        try:
            urllib.request.urlopen(f"http://{self.endpoint}{path}", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # 404: no such bucket, as meant
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = self._lines()
            for i in range(len(lines) - 1, -1, -1):
                if lines[i][1] == path:
                    return i
            time.sleep(0.01)
        raise RuntimeError(f"the marker request {path} never reached the access log")

    def requests_since(self, mark: int) -> list[tuple[str, str]]:
        """The requests logged between `mark` and a new mark (neither marker counted)."""
        end = self.mark()
        return self._lines()[mark + 1:end]


def serve_s3(tmp_path_factory):
    """The body of the session fixture `s3_server` (tests/integration/conftest.py): a moto S3 server with the
    bucket `fleet-test`, and dummy AWS credentials in this process's environment while it runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _CREDENTIALS.items():
            patch.setenv(name, value)
        server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
        try:
            server.filesystem().create_dir(BUCKET)
            yield server
        finally:
            server.stop()
