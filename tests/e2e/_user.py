"""A user's folder for the e2e tests that start clusters of their own: a small trained repository, the CLI on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from cluster.ports import free_ports

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _env(root: Path) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLEET_CONFIG": str(root / "none.yaml")}


def train_folder(root: Path) -> Path:
    """What `python -m training.bootstrap` leaves in a user's folder (fraud on 4,000 rows, 2 epochs; digits):
    `model_repository` and `data` (the example parquet file the jobs train on). Once per session
    (tests/e2e/conftest.py). `--trainer plain` trains the same models without the short local Ray run `make serve`
    makes of it (the job path is tested by tests/integration/test_training_jobs.py and the jobs of test_cli.py):
    20 s less."""
    out = run([str(BIN / "python"), "-m", "training.bootstrap", "--repository", "model_repository",
               "--rows", "4000", "--epochs", "2", "--trainer", "plain", "--if-empty"], root, _env(root))
    assert out.returncode == 0, out.stderr
    assert "published fraud version 1" in out.stdout and "published digits version 1" in out.stdout, out.stdout
    from training.data import ensure_example_data

    ensure_example_data(root / "data", "fraud", rows=4000, seed=0)  # as the Ray path writes it
    return root


def user_folder(root: Path, trained: Path) -> dict:
    """`root` with a copy of the session's trained folder (`train_folder`); the environment to run fleet there
    (no fleet.yaml of the caller's, the venv's CLIs first)."""
    for name in ("model_repository", "data"):
        shutil.copytree(trained / name, root / name)
    return _env(root)


def fleet_up(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`fleet up <args> --port P --dashboard-port D --grpc-port G` on three ports chosen in one call; chosen again when one was
    taken between choosing and binding. Returns (the run, the port flags)."""
    for attempt in range(3):
        port, dash, grpc_port = free_ports(3)
        flags = ["--port", str(port), "--dashboard-port", str(dash), "--grpc-port", str(grpc_port)]
        up = run(["fleet", "up", *args, *flags], cwd, env)
        if up.returncode == 0 or "in use" not in up.stdout + up.stderr or attempt == 2:
            return up, flags
        run(["fleet", "down", *flags], cwd, env)
