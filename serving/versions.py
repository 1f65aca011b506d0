"""Live version pickup: a model's loaded versions follow the repository's served set, in place.

`ServedVersions` holds one model's backends in one replica (an ingress replica
for a colocated model, a worker replica for a split one) and which of them are
served. `sync()` reads the served set (`ModelRepository.served_versions`: the
version_policy — or an administrator's pin, or nothing once an administrator
unloaded the model, `<model>/serving.json` — over the published versions the
training gate did not reject),
loads and warms up what is new next to what serves, then switches with one
assignment, so a batch runs either on the old set or on the new one. A version
that leaves the set keeps its backend for `retire_grace_s` (calls already routed
to it, or sent by an ingress replica that has not refreshed yet, still work) and
is then closed.

A version that fails to load is logged and left out: the policy picks among the
others (`latest: 1` falls back to the newest one that loads), so the model keeps
serving what it served; the version is tried again after `_RETRY_FAILED_S`.

`poll()` syncs every interval with ±20 % jitter, so the replicas of a cluster
switch one after another rather than all at once. Nothing here runs per request
but `on_miss`: a call for a version this replica has not loaded syncs at once,
so a worker that polls later than the replica the ingress learned the version
from loads it instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable

from serving.backends import Backend, make_backend
from serving.model_config import ModelSpec
from serving.errors import RepositoryError
from serving.registry import ModelRepository, ServingState
from serving.rollout.config import rollout_config
from serving.rollout.state import RolloutState, read_rollout

__all__ = ["ServedVersions", "OnSwitch"]

_log = logging.getLogger("fleet.versions")

OnSwitch = Callable[[], Awaitable[None]]  # called after every change of the served set

_JITTER = 0.2  # ±20 % of the poll interval
_RETRY_FAILED_S = 60.0  # a version that failed to load is tried again after this long
_MISS_SYNC_MIN_S = 0.5  # however many calls miss, at most one repository read per this long


class ServedVersions:
    """One model's loaded backends in this replica and the versions among them that are served."""

    def __init__(self, repository: ModelRepository, model: str, spec: ModelSpec, *, threads: int | None = None,
                 retire_grace_s: float = 15.0):
        self.repository = repository
        self.model = model
        self.spec = spec
        self.threads = threads
        self.retire_grace_s = retire_grace_s
        self.served: tuple[int, ...] = ()  # ascending; replaced whole at a switch, never edited
        self.backends: dict[int, Backend] = {}  # served and retiring versions
        self.on_switch: OnSwitch | None = None
        self.last_error: str | None = None  # the latest load failure, for the start-up error message
        self.state = ServingState()  # the administrator's say (serving.json) as last read
        self.progressive = rollout_config(spec) is not None  # canary/shadow: rollout.json picks the versions
        self.rollout: RolloutState | None = None  # rollout.json as last read (progressive models)
        self._retiring: dict[int, asyncio.Task] = {}
        self._failed: dict[int, float] = {}  # version -> time.monotonic() of its failed load
        self.load_errors: dict[int, str] = {}  # version -> why it failed to load (until it loads)
        self._lock = asyncio.Lock()
        self._last_sync = -float("inf")
        self._poller: asyncio.Task | None = None

    # -- syncing -----------------------------------------------------------------
    async def sync(self) -> bool:
        """Bring the served set in line with the repository's; True when it changed.

        Reading the repository and loading run off the event loop (a thread, the
        backend's own load), so requests keep being answered meanwhile.
        """
        async with self._lock:
            changed = await self._sync()
        if changed:
            await self._notify()
        return changed

    async def _sync(self) -> bool:
        self._last_sync = time.monotonic()
        accepted, state, rollout = await asyncio.to_thread(self._read_repository)
        state_changed, self.state = state != self.state, state
        if rollout is not None and (self.rollout is None or rollout.epoch != self.rollout.epoch):
            state_changed, self.rollout = True, rollout
        started = time.perf_counter()
        loaded: list[int] = []
        while True:
            now = time.monotonic()
            usable = [v for v in accepted if v not in self._failed or now - self._failed[v] >= _RETRY_FAILED_S]
            wanted = tuple(state.select(self.spec, usable, self.rollout))
            missing = [v for v in wanted if v not in self.backends]
            if not missing:
                break
            results = await asyncio.gather(*(self._load(v) for v in missing), return_exceptions=True)
            for version, result in zip(missing, results):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancelled: the replica is stopping
                    self._failed[version] = time.monotonic()
                    self.last_error = f"version {version}: {type(result).__name__}: {result}"
                    self.load_errors[version] = f"{type(result).__name__}: {result}"[:500]
                    _log.error("model %s version %s failed to load and is not served: %s", self.model, version, result,
                               extra={"model": self.model, "version": str(version), "event": "version_load_failed"})
                else:
                    self.backends[version] = result
                    self._failed.pop(version, None)
                    self.load_errors.pop(version, None)
                    loaded.append(version)
        if wanted == self.served:
            return state_changed
        if not wanted and state.loaded:
            # Nothing left to serve (versions deleted, none loads): keep what serves rather than go down.
            if self.served:
                _log.warning("model %s: the repository offers no version to serve; keeping %s",
                             self.model, list(self.served))
            return state_changed
        old, self.served = self.served, wanted  # the switch (to nothing: an administrator unloaded the model)
        for version in wanted:
            task = self._retiring.pop(version, None)
            if task is not None:
                task.cancel()  # back in the set before its grace ran out: keep it
        for version in self.backends:
            if version not in wanted and version not in self._retiring:
                self._retiring[version] = asyncio.get_running_loop().create_task(
                    self._retire(version), name=f"retire:{self.model}:{version}")
        _log.info("model %s: serving versions %s -> %s (loaded %s in %.2f s)", self.model, list(old), list(wanted),
                  loaded or "nothing", time.perf_counter() - started,
                  extra={"model": self.model, "version": ",".join(map(str, wanted)), "event": "version_switch"})
        return True

    def _read_repository(self) -> tuple[list[int], ServingState, RolloutState | None]:
        accepted = self.repository.accepted_versions(self.model, self.spec)
        try:
            state = self.repository.serving_state(self.model)
        except RepositoryError as exc:  # a broken serving.json: keep following the last good one
            _log.warning("model %s: %s; keeping %s", self.model, exc, self.state)
            state = self.state
        rollout = None
        if self.progressive:
            try:
                rollout = read_rollout(self.repository, self.model)
            except (RepositoryError, OSError) as exc:  # a broken rollout.json: keep following the last good one
                _log.warning("model %s: %s; keeping the rollout state of epoch %s", self.model, exc,
                             self.rollout.epoch if self.rollout else None)
                rollout = self.rollout
        return accepted, state, rollout

    async def _load(self, version: int) -> Backend:
        model_file = None
        if self.spec.backend != "triton":
            # A remote repository hands the file's bytes: read them off the event loop.
            model_file = await asyncio.to_thread(self.repository.model_file, self.model, version, self.spec)
        backend = make_backend(self.spec, version, model_file, threads=self.threads)
        try:
            await backend.load()  # TorchScript: load and warm up on the backend's own thread
        except BaseException:
            await backend.close()
            raise
        return backend

    async def _retire(self, version: int) -> None:
        await asyncio.sleep(self.retire_grace_s)
        self._retiring.pop(version, None)
        backend = self.backends.pop(version, None)
        if backend is not None:
            await backend.close()
            _log.debug("model %s: version %s closed after its grace", self.model, version)

    async def _notify(self) -> None:
        if self.on_switch is None:
            return
        try:
            await self.on_switch()
        except Exception as exc:  # noqa: BLE001 - the next periodic refresh catches up
            _log.warning("model %s: the switch could not be announced: %s", self.model, exc)

    # -- what requests and the replica call --------------------------------------
    async def on_miss(self, version: int) -> Backend | None:
        """The backend of a version this replica had not loaded: sync now, then look again.

        A sync that started after the call arrived answers for it (concurrent
        misses share one). A version newer than all served ones always syncs (the
        ingress learned of it from a replica that polled first); an older one (a
        retired version asked for by a stale ingress) at most every `_MISS_SYNC_MIN_S`.
        """
        arrived = time.monotonic()
        changed = False
        async with self._lock:
            if version not in self.backends and self._last_sync < arrived:
                newer = not self.served or version > self.served[-1]
                if newer or arrived - self._last_sync >= _MISS_SYNC_MIN_S:
                    try:
                        changed = await self._sync()
                    except Exception as exc:  # noqa: BLE001 - the caller answers "not loaded"
                        _log.warning("model %s: could not sync for version %s: %s", self.model, version, exc)
        if changed:
            await self._notify()
        return self.backends.get(version)

    def start_polling(self, interval_s: float) -> None:
        """Sync every `interval_s` (±20 % jitter) until `close()`; 0 turns it off."""
        if interval_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(interval_s),
                                                                  name=f"versions:{self.model}")

    async def _poll(self, interval_s: float) -> None:
        rng = random.Random()
        while True:
            await asyncio.sleep(interval_s * rng.uniform(1 - _JITTER, 1 + _JITTER))
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - a repository hiccup must not stop the polling
                _log.warning("model %s: could not read the repository for new versions: %s", self.model, exc)

    async def close(self) -> None:
        """Stop polling, drop the pending retirements and close every backend."""
        tasks = [t for t in (self._poller, *self._retiring.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poller = None
        self._retiring.clear()
        backends, self.backends, self.served = list(self.backends.values()), {}, ()
        for backend in backends:
            await backend.close()
