"""A user's folder for the e2e tests that start clusters of their own: a small trained repository, the CLI on PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster.ports import free_ports

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def user_folder(root: Path) -> dict:
    """`root` with `model_repository` holding the fraud model (4,000 rows, 2 epochs, as `make serve` trains it,
    smaller); the environment to run fleet there (no fleet.yaml of the caller's, the venv's CLIs first)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLEET_CONFIG": str(root / "none.yaml")}
    out = run([str(BIN / "python"), "-m", "training.bootstrap", "--repository", "model_repository",
               "--rows", "4000", "--epochs", "2", "--if-empty"], root, env)
    assert out.returncode == 0, out.stderr
    return env


def fleet_up(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`fleet up <args> --port P --dashboard-port D` on two ports chosen in one call; chosen again when one was
    taken between choosing and binding. Returns (the run, the port flags)."""
    for attempt in range(3):
        port, dash = free_ports(2)
        flags = ["--port", str(port), "--dashboard-port", str(dash)]
        up = run(["fleet", "up", *args, *flags], cwd, env)
        if up.returncode == 0 or "in use" not in up.stdout + up.stderr or attempt == 2:
            return up, flags
        run(["fleet", "down", *flags], cwd, env)
