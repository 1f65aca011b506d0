"""Free TCP ports for services that bind them a few seconds later.

A port the kernel hands out for `bind(0)` lies in the ephemeral range, which
Ray's many outgoing connections also draw from; picked now and bound seconds
later (HAProxy's stats port, a dashboard), it is sometimes taken by then. So
pick below the ephemeral range and above Ray's worker ports (10002-19999),
clear of Serve's direct-ingress ports (30000-31000).
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_ports", "free_port"]

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
