"""Retraining the monitor starts: when an alarm on a model's serving version persists, submit a Ray job.

A drift or quality alarm on the version a model serves (its newest served version) that has held
for `after_s` (the cluster's `retrain_after_s`, or the model's own `fleet.retrain.after_s`
parameter, "off" for never) makes the monitor submit `python -m training.retrain --model <trainer> --publish-as
<model> [args]` to the cluster's job server (the Jobs SDK), with the alarms as the job's evidence:
- one job at a time per model (the next waits until the last one ended), and at least
  `cooldown_s` between two submissions for a model;
- `<trainer>` is the config's `fleet.retrain.model` parameter, else the model's own name when it
  is an example model training.retrain knows (fraud, digits); a model with neither is reported and
  never submitted; `fleet.retrain.args` adds flags (e.g. "--epochs 3 --num-workers 1");
- every decision is an audit record (submitted, failed to submit, the job's end) with its evidence;
- both rules outlive the monitor: a restarted monitor (Ray restarts the actor when it dies) takes each model's
  latest job back from the audit log's tail and follows it, so it neither submits a second job beside one
  that runs nor forgets the cooldown.
The job publishes its candidate through the same gate as any retrain: only an accepted version is
served, so a retrain on noise cannot replace a good version with a worse one.
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import Callable

__all__ = ["RETRAIN_MODEL_PARAM", "RETRAIN_ARGS_PARAM", "RETRAIN_AFTER_PARAM", "TRAINERS", "RetrainTrigger",
           "jobs_sdk"]

_log = logging.getLogger("fleet.retrain")

RETRAIN_MODEL_PARAM = "fleet.retrain.model"
RETRAIN_ARGS_PARAM = "fleet.retrain.args"
RETRAIN_AFTER_PARAM = "fleet.retrain.after_s"  # a model's own retrain_after_s ("off": never)
TRAINERS = ("fraud", "digits")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ENDED = (*_TERMINAL, "UNKNOWN")  # UNKNOWN: a job from before a restart that the job server no longer knows
_RESTORE_BYTES = 8 << 20  # how much of the audit log's tail a restarted monitor reads back


class RetrainTrigger:
    """Decides and submits the monitor's retrains (`submit(entrypoint, metadata) -> job id`, `status(job id)`)."""

    def __init__(self, after_s: float | None, cooldown_s: float, submit: Callable[[str, dict], str] | None,
                 status: Callable[[str], str] | None, audit, clock: Callable[[], float] = time.time):
        self.after_s = after_s
        self.cooldown_s = cooldown_s
        self._submit = submit
        self._status = status
        self.audit = audit
        self._clock = clock
        self.jobs: dict[str, dict] = {}  # model -> the latest job {id, version, submitted_at, status}
        self.outcomes: dict[tuple[str, str], int] = {}  # (model, outcome) -> count
        self._unsupported_reported: set[str] = set()
        self._restore()

    def _restore(self) -> None:
        """Each model's latest job, from the audit log's tail (see the module doc)."""
        for record in self.audit.tail(_RESTORE_BYTES):
            event, model = str(record.get("event", "")), record.get("model")
            if not event.startswith("retrain_") or model is None:
                continue
            try:
                if event == "retrain_submitted":
                    self.jobs[model] = {"id": record["job"], "version": record.get("version"), "status": "PENDING",
                                        "submitted_at": float(record.get("submitted_at", record["time"])),
                                        "restored": True}
                elif event == "retrain_submit_failed":
                    self.jobs[model] = {"id": None, "version": record.get("version"), "status": "FAILED",
                                        "submitted_at": float(record.get("submitted_at", record["time"]))}
                elif model in self.jobs and self.jobs[model]["id"] == record.get("job") and "status" in record:
                    self.jobs[model]["status"] = record["status"]
            except (KeyError, TypeError, ValueError):
                continue  # not a record this monitor wrote
        if self.jobs:
            running = sorted(m for m, j in self.jobs.items() if j["status"] not in _ENDED)
            _log.info("retrain: %d model(s)' latest jobs taken back from the audit log (%s still running)",
                      len(self.jobs), ", ".join(running) or "none")

    @property
    def enabled(self) -> bool:
        return self._submit is not None

    def after(self, parameters) -> float | None:
        """How long an alarm must hold before `model` is retrained (None: never)."""
        raw = parameters.get(RETRAIN_AFTER_PARAM)
        if raw is None:
            return self.after_s
        if raw.strip().lower() in ("off", "none", "never"):
            return None
        try:
            value = float(raw)
        except ValueError:
            return None
        return value if value >= 0 else None

    def _count(self, model: str, outcome: str) -> None:
        self.outcomes[(model, outcome)] = self.outcomes.get((model, outcome), 0) + 1

    def entrypoint(self, model: str, parameters) -> str | None:
        trainer = parameters.get(RETRAIN_MODEL_PARAM) or (model if model in TRAINERS else None)
        if trainer not in TRAINERS:
            return None
        extra = shlex.split(parameters.get(RETRAIN_ARGS_PARAM, ""))
        return shlex.join(["python", "-m", "training.retrain", "--model", trainer, "--publish-as", model, *extra])

    def _follow(self, model: str) -> bool:
        """True while the model's latest job runs; records its end once."""
        job = self.jobs.get(model)
        if job is None or job["status"] in _ENDED:
            return False
        try:
            status = str(self._status(job["id"])) if self._status else "UNKNOWN"
        except Exception as exc:  # noqa: BLE001 - the job server is busy or restarting: ask again later
            if job.get("restored"):  # a job from before the restart that this job server does not know: over
                job["status"] = "UNKNOWN"
                self.audit.write({"event": "retrain_unknown", "model": model, "job": job["id"],
                                  "version": job["version"], "status": "UNKNOWN",
                                  "error": f"{type(exc).__name__}: {exc}"})
                return False
            _log.warning("retrain of %s: cannot read job %s's status: %s", model, job["id"], exc)
            return True
        job["status"] = status
        if status in _TERMINAL:
            outcome = "succeeded" if status == "SUCCEEDED" else "failed"
            self._count(model, outcome)
            self.audit.write({"event": "retrain_" + outcome, "model": model, "job": job["id"],
                              "version": job["version"], "status": status,
                              "duration_s": round(self._clock() - job["submitted_at"], 1)})
            return False
        return True

    def check(self, model: str, parameters, version: int, alarms: list[dict]) -> dict | None:
        """Submit a retrain of `model` if its `alarms` (active, on its serving `version`) have held long enough."""
        if not self.enabled:
            return None
        running = self._follow(model)
        after_s = self.after(parameters)
        if after_s is None:
            return None
        now = self._clock()
        held = [a for a in alarms if now - a["since"] >= after_s]
        if not held or running:
            return None
        last = self.jobs.get(model)
        if last is not None and now - last["submitted_at"] < self.cooldown_s:
            return None
        entrypoint = self.entrypoint(model, parameters)
        if entrypoint is None:
            if model not in self._unsupported_reported:
                self._unsupported_reported.add(model)
                self.audit.write({"event": "retrain_unsupported", "model": model, "version": version,
                                  "why": f"no {RETRAIN_MODEL_PARAM} parameter and not one of {list(TRAINERS)}"})
            return None
        evidence = {"version": version, "alarms": held, "held_s": round(now - min(a["since"] for a in held), 1)}
        record = {"model": model, "version": version, "entrypoint": entrypoint, "evidence": evidence}
        try:
            job_id = self._submit(entrypoint, {"fleet.trigger": "monitor", "fleet.model": model,
                                              "fleet.version": str(version)})
        except Exception as exc:  # noqa: BLE001 - reported, counted, tried again after the cooldown
            self._count(model, "failed_to_submit")
            self.jobs[model] = {"id": None, "version": version, "submitted_at": now, "status": "FAILED"}
            self.audit.write({"event": "retrain_submit_failed", **record, "submitted_at": now,
                              "error": f"{type(exc).__name__}: {exc}"})
            _log.error("retrain of %s could not be submitted: %s", model, exc)
            return None
        self._count(model, "submitted")
        self.jobs[model] = {"id": job_id, "version": version, "submitted_at": now, "status": "PENDING"}
        self.audit.write({"event": "retrain_submitted", **record, "job": job_id, "submitted_at": now})
        _log.warning("model %s: alarms on version %s held %.0f s: submitted retrain job %s", model, version,
                     evidence["held_s"], job_id)
        return {**record, "job": job_id}


def jobs_sdk(address: str, nice: int = 0) -> tuple[Callable[[str, dict], str], Callable[[str], str]]:
    """(submit, status) over the Ray Jobs SDK at `address`, with the cluster's token (cluster.jobs); the jobs'
    processes reniced to `nice` (training/priority.py)."""
    from cluster.jobs import auth_env, job_runtime_env, submit

    client: list = []

    def _client():
        if not client:  # made when the first retrain is due: nothing is asked of the job server before
            auth_env()
            from ray.job_submission import JobSubmissionClient

            client.append(JobSubmissionClient(address))
        return client[0]

    def do_submit(entrypoint: str, metadata: dict) -> str:
        return submit(_client(), entrypoint=entrypoint, runtime_env=job_runtime_env(nice=nice), metadata=metadata)

    def do_status(job_id: str) -> str:
        return str(_client().get_job_status(job_id).value)

    return do_submit, do_status
