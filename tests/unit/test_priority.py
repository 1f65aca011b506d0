"""A training job's CPU priority (training/priority.py): every thread of each of its processes reniced, the runtime
env that does it for every process of a job (cluster/jobs.py). A live job's logs: tests/integration/test_training_jobs.py."""

from __future__ import annotations

import os
import subprocess
import sys

from cluster.jobs import job_runtime_env

_CHILD = """
import os, threading, time
from training.priority import lower_priority
stop = threading.Event()
before = threading.Thread(target=stop.wait, daemon=True)  # started before: reniced too
before.start()
nice = lower_priority()
after = []
t = threading.Thread(target=lambda: after.append(os.getpriority(os.PRIO_PROCESS, 0)))  # started after: inherits
t.start(); t.join()
threads = {}
for tid in os.listdir("/proc/self/task"):  # t's OS thread may still be on its way out: listed, then gone
    try:
        threads[int(tid)] = int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
    except FileNotFoundError:
        pass
stop.set(); before.join()
print(nice, after[0], sorted(set(threads.values())), len(threads))
"""


def _run(env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _CHILD], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(maxsplit=2)


def test_every_thread_of_the_process_takes_the_jobs_niceness():
    nice, later, rest = _run({"FLEET_TRAIN_NICE": "7"})
    assert nice == "7" and later == "7"
    values, count = rest.rsplit(maxsplit=1)
    assert values == "[7]" and int(count) >= 2  # the main thread and the one started before, both at 7


def test_no_niceness_asked_leaves_the_process_as_it_started():
    base = str(os.getpriority(os.PRIO_PROCESS, 0))
    for env in ({"FLEET_TRAIN_NICE": "0"}, {"FLEET_TRAIN_NICE": "not a number"}):
        nice, later, _ = _run(env)
        assert nice == base and later == base


def test_a_job_asked_to_be_nice_carries_the_setting_and_the_hook_to_every_process():
    env = job_runtime_env(nice=19)
    assert env["env_vars"] == {"FLEET_TRAIN_NICE": "19"}
    assert env["worker_process_setup_hook"] == "training.priority.lower_priority"
    module, _, function = env["worker_process_setup_hook"].rpartition(".")
    assert callable(getattr(__import__(module, fromlist=[function]), function))
    assert set(job_runtime_env(nice=0)) == {"working_dir"}
