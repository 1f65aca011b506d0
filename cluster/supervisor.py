"""The process behind `fleet up` / `fleet serve`: owns the local cluster until SIGTERM/SIGINT.

It runs in its own session, so a Ctrl-C at the user's terminal reaches only the
`fleet` command, which then asks this process to shut the cluster down in order
(Serve, then Ray) instead of every Ray process dying at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

from cluster.config import FleetSettings
from cluster.local import LocalCluster
from cluster.state import StateFile

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.supervisor")
    parser.add_argument("--settings-json", required=True)
    args = parser.parse_args(argv)
    settings = FleetSettings(**json.loads(args.settings_json))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = StateFile(settings.state_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    base = {"pid": os.getpid(), "url": settings.url, "dashboard_url": settings.dashboard_url,
            "repository": settings.repository, "started_at": time.time(), "settings": settings.model_dump()}
    state.write({**base, "status": "starting"})
    cluster = LocalCluster(settings)
    try:
        cluster.start()
    except BaseException as exc:  # report why, then leave nothing running
        traceback.print_exc()
        state.write({**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        cluster.stop()
        return 1
    # ray.init installed Ray's own failure handler for SIGTERM (it logs the signal and ends the process at once,
    # killing the cluster with no drain and losing what replicas buffer): ours again, for an orderly stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Where it answers and the job server, as the cluster says (a Ray cluster fleet attached to has its own).
    base.update(url=cluster.url, dashboard_url=cluster.dashboard_url, attached=cluster.attached)
    state.write({**base, "status": "ready"})
    print(f"fleet ready on {cluster.url}", flush=True)
    stop.wait()
    state.write({**base, "status": "stopping"})
    cluster.stop()
    state.remove()
    print("fleet stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
