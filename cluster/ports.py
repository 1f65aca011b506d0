"""Free TCP ports for services that bind them a few seconds later.

A port the kernel hands out for `bind(0)` lies in the ephemeral range, which
Ray's many outgoing connections also draw from; picked now and bound seconds
later (HAProxy's stats port, a dashboard), it is sometimes taken by then. So
pick below the ephemeral range and above Ray's worker ports (10002-19999),
clear of Serve's direct-ingress ports (30000-31000).
"""

from __future__ import annotations

import contextlib
import random
import socket

__all__ = ["free_ports", "free_port", "port_taken", "with_free_ports", "ray_agent_port"]

_LOW, _HIGH = 20000, 29999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: HAProxy's stats listener binds 0.0.0.0
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now, outside the ephemeral range."""
    chosen: list[int] = []
    for port in random.sample(range(_LOW, _HIGH + 1), _HIGH - _LOW + 1):
        if _bindable(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"fewer than {count} free ports in {_LOW}-{_HIGH}")


def free_port() -> int:
    return free_ports(1)[0]


_TAKEN_WORDS = ("address already in use", "in use", "eaddrinuse", "bind", "port")


def port_taken(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) says a port was taken: the race between choosing one and binding it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            return True
        text = str(exc).lower()
        if "address already in use" in text or ("port" in text and ("in use" in text or "bind" in text
                                                                    or "taken" in text)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def with_free_ports(count: int, start, *, attempts: int = 3, taken=port_taken):
    """`start(ports)` with `count` distinct free ports chosen in one call; chosen again (up to `attempts`
    times) when `start` fails because one of them was taken between choosing and binding. Returns its result."""
    for attempt in range(1, attempts + 1):
        ports = free_ports(count)
        try:
            return start(ports)
        except Exception as exc:
            if attempt == attempts or not taken(exc):
                raise


@contextlib.contextmanager
def ray_agent_port(port: int):
    """Ray nodes started in this block run their dashboard agent's HTTP server on `port`.

    Ray starts it on 52365 whatever the cluster, and `ray.init` has no parameter for it: on a machine
    where another Ray cluster (a test session) holds 52365, the agent of a second one "stays alive but
    the HTTP service will be disabled", and every job submission fails with "No available agent" (the
    lifecycle's retrain). This sets the default of `RayParams` (how `ray.init` passes its settings on)
    for the block: a private Ray interface, so any failure to find it leaves Ray's default.
    """
    try:
        from ray._private.parameter import RayParams
    except ImportError:
        yield
        return
    original = RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    RayParams.__init__ = init
    try:
        yield
    finally:
        RayParams.__init__ = original
