"""fleet's Prometheus rules, `promtool`, and a real Prometheus server for tests and benchmarks.

`RULES_FILE` is the alerting rules fleet ships (`cluster/alerts/fleet-rules.yml`, unit-tested by
`RULES_TEST_FILE` with `promtool test rules`). `PrometheusServer` runs Debian's `prometheus` binary
against given `/metrics` targets with those rules loaded, scraping and evaluating every second, and
reads back what it sees over its HTTP API::

    with PrometheusServer.start(["http://127.0.0.1:8000"]) as prom:
        prom.wait_for('up{job="fleet"} == 1', timeout_s=30)
        alert = prom.wait_for_alert("FleetFeatureDrift", labels={"model": "fraud"}, timeout_s=60)

The binaries come from Debian's `prometheus` package (`make prometheus` installs it). Standard
library, PyYAML and `cluster.ports` only: no Ray.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from cluster.ports import free_ports

__all__ = [
    "RULES_FILE",
    "RULES_TEST_FILE",
    "PrometheusServer",
    "binary",
    "check_metrics",
    "promtool",
]

RULES_FILE = Path(__file__).resolve().parent / "alerts" / "fleet-rules.yml"
RULES_TEST_FILE = RULES_FILE.with_name("fleet-rules.test.yml")

_HOST = "127.0.0.1"
_POLL_INTERVAL_S = 0.1
_LOG_TAIL_LINES = 30
_STOP_GRACE_S = 10.0
_T = TypeVar("_T")


def binary(name: str) -> str:
    """Path of `prometheus` or `promtool` on PATH.

    Raises:
        FileNotFoundError: not installed; `make prometheus` installs Debian's package.
    """
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} is not on PATH: install Debian's prometheus package "
            f"(`make prometheus`, or `apt-get install --no-install-recommends prometheus`)"
        )
    return path


def promtool(*args: str, input: str | bytes | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Run `promtool args...` (stdout and stderr captured as text, never raising on its exit code)."""
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run([binary("promtool"), *args], input=data, capture_output=True, timeout=timeout_s)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def check_metrics(exposition: str | bytes) -> str:
    """What `promtool check metrics` finds wrong with a Prometheus text exposition; "" when nothing."""
    result = promtool("check", "metrics", input=exposition)
    problems = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not problems:
        problems = f"promtool check metrics exited with code {result.returncode}"
    return problems


class PrometheusServer:
    """A running Prometheus subprocess with a private storage folder; build it with :meth:`start`."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self._popen = popen
        self.port = port
        self.workdir = workdir
        self._stopped = False

    @classmethod
    def start(
        cls,
        targets: Sequence[str],
        *,
        rule_files: Iterable[str | Path] = (RULES_FILE,),
        job: str = "fleet",
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
        bearer_token: str | None = None,
        timeout_s: float = 60.0,
        attempts: int = 5,
    ) -> PrometheusServer:
        """Start Prometheus scraping `targets` and evaluating `rule_files`; return once it is ready.

        Args:
            targets: `/metrics` endpoints as URLs (`http://127.0.0.1:8000`, path `/metrics` by default)
                or `host:port`; one scrape job `job` holds them all, so they must share scheme and path.
            rule_files: rule files to load; default fleet's alerting rules.
            scrape_interval_s, evaluation_interval_s: seconds between scrapes and between rule evaluations.
            bearer_token: sent as `Authorization: Bearer` when the cluster has API keys.
            timeout_s: how long to wait for readiness, in seconds.
            attempts: ports to try when the one chosen is taken before Prometheus binds it.

        Raises:
            ValueError: targets that one scrape job cannot hold.
            RuntimeError: Prometheus exited or was not ready in time; the message ends with its log.
        """
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        config = _config(targets, [Path(f).resolve() for f in rule_files], job, scrape_interval_s,
                         evaluation_interval_s, bearer_token)
        workdir = Path(tempfile.mkdtemp(prefix="fleet-prometheus-"))
        try:
            (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            attempt = 0
            while True:
                attempt += 1
                server = cls._launch(free_ports(1)[0], workdir)
                try:
                    server._wait_ready(timeout_s)
                    return server
                except _PortTaken:
                    server._terminate()
                    if attempt == attempts:
                        raise RuntimeError(f"Prometheus found its port taken {attempts} times; "
                                           f"end of its log:\n{server.log_tail()}") from None
                except BaseException:
                    server._terminate()
                    raise
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    @classmethod
    def _launch(cls, port: int, workdir: Path) -> PrometheusServer:
        shutil.rmtree(workdir / "data", ignore_errors=True)  # a failed attempt's storage
        command = [
            binary("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={_HOST}:{port}",
            "--storage.tsdb.retention.time=1d",
        ]
        with open(workdir / "prometheus.log", "wb") as log:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=workdir, start_new_session=True)
        return cls(popen, port, workdir)

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def is_running(self) -> bool:
        return self._popen.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """`data` of a GET on `/api/v1/<path>`.

        Raises:
            RuntimeError: the API answered an error (a bad expression, ...), with its message.
        """
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query now: [{"metric": {label: value}, "value": float}] (an instant vector's samples,
        or one sample without labels for a scalar)."""
        data = self.api("query", query=expr)
        # Values come as text: float() reads Prometheus' "NaN", "+Inf" and "-Inf" too.
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def alerts(self) -> list[dict]:
        """Active alerts (pending and firing), each with `labels`, `annotations`, `state`, `value`."""
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        """Every loaded rule, with `name`, `query`, `health` ("ok", "err", "unknown" until evaluated),
        `lastError` and its `group` added."""
        return [dict(rule, group=group["name"]) for group in self.api("rules")["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict]:
        """Active scrape targets, with `labels`, `scrapeUrl`, `health` ("up", "down", "unknown") and `lastError`."""
        return self.api("targets", state="active")["activeTargets"]

    # -- waiting ------------------------------------------------------------------------------------

    def wait_for(self, expr: str, timeout_s: float = 30.0) -> list[dict]:
        """The samples of `expr` once it returns any (a filter like `up == 1` waits until it holds).

        Raises:
            TimeoutError: still empty after `timeout_s` seconds.
        """
        return self._wait(lambda: self.query(expr) or None, timeout_s, f"{expr!r} returned nothing")

    def wait_for_alert(self, name: str, *, labels: dict[str, str] | None = None, state: str = "firing",
                       timeout_s: float = 60.0) -> dict:
        """The first alert `name` in `state` whose labels include `labels`."""
        want = labels or {}

        def find() -> dict | None:
            return next((a for a in self.alerts() if a["labels"].get("alertname") == name and a["state"] == state
                         and all(a["labels"].get(k) == v for k, v in want.items())), None)

        return self._wait(find, timeout_s, f"no {state} alert {name} {want}")

    def wait_rules_evaluated(self, timeout_s: float = 30.0) -> list[dict]:
        """Every rule once each has been evaluated at least once (none still "unknown")."""
        def evaluated() -> list[dict] | None:
            rules = self.rules()
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        return self._wait(evaluated, timeout_s, "rules not all evaluated")

    def _wait(self, probe: Callable[[], _T | None], timeout_s: float, what: str) -> _T:
        deadline = time.monotonic() + timeout_s
        while True:
            found = probe()
            if found is not None:
                return found
            if not self.is_running():
                raise RuntimeError(f"Prometheus exited while waiting: {what}; end of its log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout_s:.0f} s")
            time.sleep(_POLL_INTERVAL_S * 5)

    # -- lifecycle --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop Prometheus and delete its storage; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)  # flushes the head block and exits
            try:
                self._popen.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        self._popen.wait()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._popen.poll()
            log = self.log_tail(1000)
            if "bind: address already in use" in log:
                raise _PortTaken()
            if code is not None:
                raise RuntimeError(f"Prometheus exited with code {code} before it was ready; "
                                   f"end of its log:\n{self.log_tail()}")
            # Ours says it is ready in its log: whatever else took the port and answers there is not it.
            if "Server is ready to receive web requests" in log:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                        if response.status == 200:
                            return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus not ready after {timeout_s:.0f} s; end of its log:\n{self.log_tail()}")
            time.sleep(_POLL_INTERVAL_S)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PrometheusServer(url={self.url!r}, pid={self._popen.pid}, {'running' if self.is_running() else 'stopped'})"


class _PortTaken(Exception):
    """Prometheus could not bind the port chosen for it: someone took it in between."""


def _config(targets: Sequence[str], rule_files: list[Path], job: str, scrape_interval_s: float,
            evaluation_interval_s: float, bearer_token: str | None) -> dict:
    if not targets:
        raise ValueError("PrometheusServer needs at least one target to scrape")
    parsed = [urllib.parse.urlsplit(t if "://" in t else f"http://{t}") for t in targets]
    schemes = {p.scheme for p in parsed}
    paths = {p.path or "/metrics" for p in parsed}
    if len(schemes) > 1 or len(paths) > 1:
        raise ValueError(f"targets {list(targets)} mix schemes {sorted(schemes)} or paths {sorted(paths)}: "
                         f"one scrape job holds one of each")
    missing = [str(f) for f in rule_files if not f.is_file()]
    if missing:
        raise ValueError(f"rule files {missing} do not exist")
    scrape: dict[str, Any] = {
        "job_name": job,
        "scheme": schemes.pop(),
        "metrics_path": paths.pop(),
        "scrape_interval": _duration(scrape_interval_s),
        "scrape_timeout": _duration(scrape_interval_s),
        "static_configs": [{"targets": [p.netloc for p in parsed]}],
    }
    if bearer_token is not None:
        scrape["authorization"] = {"type": "Bearer", "credentials": bearer_token}
    return {
        "global": {"scrape_interval": _duration(scrape_interval_s),
                   "evaluation_interval": _duration(evaluation_interval_s)},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": [scrape],
    }


def _duration(seconds: float) -> str:
    """Prometheus' duration syntax, in whole milliseconds."""
    if seconds <= 0:
        raise ValueError(f"an interval must be positive, not {seconds} s")
    return f"{max(1, round(seconds * 1000))}ms"
