"""The monitor actor: one named, detached Ray actor holding the cluster-wide statistics and monitoring.

It wraps `serving.monitor.MonitorState` (request statistics, queue depths, breakers) and a
`MonitoringEngine` (drift, label join, quality, alarms, retraining), and runs the engine's
`tick` on a thread of its own every `monitor_interval_s`. Replicas call `push` about once a
second; the routes call `render`, `totals` and `report`. Methods run on a small thread pool
(a threaded actor), so a slow label join never holds up a replica's push: state is guarded by
locks, not by running one call at a time.
"""

from __future__ import annotations

import logging
import threading
import time

from serving.telemetry.logs import configure_logging, in_ray_actor
from serving.monitor import MonitorState
from serving.monitoring.engine import MonitoringEngine
from serving.monitoring.exposition import MonitoringCollector
from serving.rollout.controller import RolloutController
from serving.rollout.exposition import RolloutCollector

__all__ = ["MonitorActor"]

_log = logging.getLogger("fleet.monitor")


class MonitorActor:
    """What `get_monitor()` runs as the actor (plain Python: usable without Ray in tests)."""

    def __init__(self, options: dict | None = None, *, start_thread: bool = True):
        if in_ray_actor():  # the monitor's own process (get_monitor): its fleet.* logs (serving/telemetry/logs.py)
            configure_logging((options or {}).get("log_format", "text"), replica=False)
        self.state = MonitorState()
        self.engine: MonitoringEngine | None = None
        self.rollout: RolloutController | None = None  # progressive delivery (serving/rollout/controller.py)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_thread = start_thread
        if options:
            self.configure(options)

    def configure(self, options: dict) -> bool:
        """Set the monitoring up from the serving options (once; later calls change nothing). True if it did."""
        with self._lock:
            if self.engine is not None:
                return False
            submit = status = None
            if options.get("dashboard_url"):  # the client is made when the first retrain is due
                from serving.monitoring.retrain import jobs_sdk

                submit, status = jobs_sdk(options["dashboard_url"], int(options.get("train_nice", 0)))
            self.engine = MonitoringEngine(options, submit=submit, status=status)
            self.state._registry.register(MonitoringCollector(self.engine))
            self.rollout = RolloutController(options, input_alarms=self.engine.input_alarms)
            self.state._registry.register(RolloutCollector(self.rollout))
            self.rollout.tick()  # every progressive model's rollout.json exists before configure returns
            if self._start_thread:
                interval = float(options.get("monitor_interval_s", 1.0))
                self._thread = threading.Thread(target=self._run, args=(interval,), name="fleet-monitor-tick",
                                                daemon=True)
                self._thread.start()
        return True

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.rollout.tick()
            except Exception:  # noqa: BLE001 - the controller keeps going; the next tick tries again
                _log.exception("a rollout tick failed")
            try:
                self.engine.tick()
                self.rollout.labels(self.engine.take_rollout_labels())
            except Exception:  # noqa: BLE001 - the monitor keeps going; the next tick tries again
                _log.exception("a monitor tick failed")

    def tick(self) -> list[dict]:
        """One round of the engine now (tests; the thread does it every monitor_interval_s)."""
        if self.rollout is not None:
            self.rollout.tick()
        events = self.engine.tick() if self.engine is not None else []
        if self.rollout is not None:
            self.rollout.labels(self.engine.take_rollout_labels())
        return events

    # -- what the replicas and routes call ----------------------------------------------------
    def push(self, replica: str, delta: dict, queue_depths: dict | None = None, breakers: dict | None = None,
             monitoring: dict | None = None) -> dict:
        """Take a replica's statistics; answer with every model's rollout route (how a rollback spreads)."""
        with self._lock:
            self.state.push(replica, delta, queue_depths, breakers, (monitoring or {}).get("cache"))
        if self.engine is not None and monitoring:
            self.engine.intake(replica, monitoring)
        if self.rollout is None:
            return {}
        self.rollout.intake((monitoring or {}).get("rollout"))
        return self.rollout.routes()

    def rollout_status(self, model: str) -> dict:
        """The controller's state of the model; during a rollout each arm also carries the monitor's online
        quality of its version (the rows window: accuracy, ROC AUC, labelled rows) when labels came back."""
        doc = self._controller().status(model)
        for version, arm in (doc.get("arms") or {}).items():
            quality = (self.engine.report("quality", model, version).get("versions") or {}).get(version)
            if quality:
                arm["quality"] = quality.get("rows")
        return doc

    def rollout_action(self, model: str, action: str, version: int | None = None, by: str = "admin",
                       mode: str | None = None, split: float | None = None) -> dict:
        return self._controller().action(model, action, version, by, mode=mode, split=split)

    def _controller(self) -> RolloutController:
        if self.rollout is None:
            raise RuntimeError("the monitor is not configured (no serving options yet)")
        return self.rollout

    def forget(self, replica: str) -> None:
        with self._lock:
            self.state.forget(replica)

    def totals(self) -> dict:
        with self._lock:
            return self.state.totals()

    def queue_depths(self) -> dict:
        with self._lock:
            return self.state.queue_depths()

    def breakers_open(self) -> dict:
        with self._lock:
            return self.state.breakers_open()

    def render(self) -> bytes:
        with self._lock:
            return self.state.render()

    def report(self, kind: str, model: str, version: str | None = None) -> dict:
        if self.engine is None:
            return {"model_name": model, "versions": {}, "note": "monitoring is not configured"}
        if kind not in ("drift", "quality"):
            raise ValueError(f"unknown report {kind!r}")
        return self.engine.report(kind, model, version)

    def engine_cpu_seconds(self) -> float:
        return self.engine.tick_seconds if self.engine is not None else 0.0

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.engine is not None:
            self.engine.close()

    def ping(self) -> float:
        return time.time()
