"""A training job's CPU priority, below serving's: the jobs fleet submits share nodes with the replicas.

`fleet train` and the monitor's retrains submit their jobs with `FLEET_TRAIN_NICE` (the `train_nice`
setting, 10 by default) in the job's environment and `lower_priority` as the job's
`worker_process_setup_hook` (cluster/jobs.py): every process of the job (its driver, the Ray Train
workers and controller, the Ray Data tasks) renices all of its threads to that niceness when it
starts, so on a node that also serves, training takes the CPU serving leaves idle instead of
slowing its answers. Niceness only rises: no privilege is needed, and a process already nicer is
left alone. 0 leaves the job as Ray starts it.
"""

from __future__ import annotations

import os

__all__ = ["ENV", "lower_priority"]

ENV = "FLEET_TRAIN_NICE"


def lower_priority() -> int:
    """Renice every thread of this process to `$FLEET_TRAIN_NICE` (where that is nicer); return the niceness."""
    try:
        target = min(19, int(os.environ.get(ENV, "0")))
    except ValueError:
        target = 0
    if target > 0:
        try:
            threads = [int(t) for t in os.listdir("/proc/self/task")]  # Linux: niceness is per thread
        except OSError:
            threads = [0]  # elsewhere: the process
        for tid in threads:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < target:
                    os.setpriority(os.PRIO_PROCESS, tid, target)
            except OSError:  # a thread that ended meanwhile
                pass
    return os.getpriority(os.PRIO_PROCESS, 0)
