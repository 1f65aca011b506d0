"""The local cluster's state file (`<state_dir>/cluster.json`), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["StateFile", "pid_alive"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class StateFile:
    def __init__(self, state_dir: str):
        self.dir = Path(state_dir).expanduser().resolve()
        self.path = self.dir / "cluster.json"
        self.log_path = self.dir / "fleet.log"

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, doc: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def running(self) -> dict | None:
        """The state of a cluster whose supervisor is alive, else None (stale files removed)."""
        doc = self.read()
        if doc is None:
            return None
        if not pid_alive(int(doc.get("pid", 0))):
            self.remove()
            return None
        return doc
