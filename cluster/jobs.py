"""`fleet train`: submit a training job to the cluster's job server and follow it, as `ray job submit` would.

Ray 2.60 turns token authentication on for local clusters (the token is in
~/.ray/auth_token); the Jobs SDK sends it only with RAY_AUTH_MODE=token, which
`fleet train` sets itself. The job's working dir is this checkout, uploaded
without what .gitignore/.rayignore leave out (venvs, data, the repository,
build output), so it stays small.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path

__all__ = ["PROJECT_ROOT", "auth_env", "train_entrypoint", "job_runtime_env", "submit", "submit_and_follow"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_env() -> None:
    """Have the Jobs SDK send the cluster's token (a user's explicit RAY_AUTH_MODE wins)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray reads its config once, at import (fleet's CLI has imported it): refresh it as ray.init does
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        return
    _enable_token_auth()


def train_entrypoint(model: str, *, tune: bool, extra: list[str]) -> str:
    """The job's command line: `python -m training.retrain|tune --model M ...`."""
    module = "training.tune" if tune else "training.retrain"
    return shlex.join(["python", "-m", module, "--model", model, *extra])


def job_runtime_env(working_dir: Path = PROJECT_ROOT, nice: int = 0) -> dict:
    """A training job's runtime env: its working dir and, with `nice` > 0, every process of the job reniced to it
    as it starts (training/priority.py): below the serving replicas on the nodes they share."""
    env: dict = {"working_dir": str(working_dir)}
    if nice > 0:
        env["env_vars"] = {"FLEET_TRAIN_NICE": str(nice)}
        env["worker_process_setup_hook"] = "training.priority.lower_priority"
    return env


def submit(client, *, attempts: int = 4, **job) -> str:
    """`client.submit_job(**job)`, retried while the job server says it has no agent ready (a busy node)."""
    for attempt in range(1, attempts):
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            time.sleep(3.0 * attempt)
    return client.submit_job(**job)  # the last attempt: its error is the caller's


_PACKAGE_GONE = "Failed to download runtime_env file package"


def submit_and_follow(address: str, entrypoint: str, *, working_dir: Path = PROJECT_ROOT, nice: int = 0,
                      follow: bool = True, submission_id: str | None = None, print_fn=print) -> tuple[str, str]:
    """Submit `entrypoint`, print its logs until it ends (unless not `follow`); return (job id, final status).
    `nice`: the job's processes' niceness (`job_runtime_env`).

    A job whose working-dir package vanished from the cluster before its driver fetched it (Ray drops
    an uploaded package soon after the last job using it ends, while a new submission of the same
    files may still count on it) is submitted once more, which uploads the package again.
    """
    auth_env()
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = job_runtime_env(working_dir, nice)
    job_id, status = _submit_and_follow(client, address, entrypoint, runtime_env, follow, submission_id, print_fn)
    if status == "FAILED" and submission_id is None and _PACKAGE_GONE in (client.get_job_info(job_id).message or ""):
        print_fn(f"job {job_id} could not fetch its working dir from the cluster; submitting it again")
        job_id, status = _submit_and_follow(client, address, entrypoint, runtime_env, follow, None, print_fn)
    return job_id, status


def _submit_and_follow(client, address: str, entrypoint: str, runtime_env: dict, follow: bool,
                       submission_id: str | None, print_fn) -> tuple[str, str]:
    job_id = submit(client, entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    print_fn(f"submitted job {job_id} to {address}: {entrypoint}")
    if not follow:
        return job_id, str(client.get_job_status(job_id).value)
    print_fn(f"following its logs (Ctrl-C stops following, not the job; RAY_AUTH_MODE=token ray job stop "
             f"--address {address} {job_id} stops it)")

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print_fn(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print_fn(f"\nstopped following; job {job_id} goes on")
        return job_id, str(client.get_job_status(job_id).value)
    status = str(client.get_job_status(job_id).value)
    deadline = time.monotonic() + 30
    while status not in _TERMINAL and time.monotonic() < deadline:  # the log stream can end just before the status
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    print_fn(f"job {job_id}: {status}")
    return job_id, status
