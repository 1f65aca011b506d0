"""How a replica process's cyclic garbage collector is set once start-up is done (`settle`).

- Everything alive after start-up (Ray, torch, the models: about 300,000 tracked objects) lives as long
  as the replica. `gc.freeze()` moves it out of the collector's reach, or each full collection walks it all
  (about 180 ms measured here, a stall of every request in flight).
- The youngest generation is collected every `YOUNG_THRESHOLD` net new container objects, not Python's
  700. At peak a replica's in-flight requests, its prediction log's buffer and its finished traces grow by
  about 100,000 objects a second that reference counting frees a few milliseconds later. At 700, about
  140 collections a second promoted them and pushed a full collection every second or so; the collector
  took about 4.5 % of a replica's time under load. At 7,000 it takes about 1 % (a scratch `gc.callbacks`
  probe, 2 replicas under 64-connection load), each young collection about 2 ms. With the two thresholds
  taking turns inside the same replicas (4 s each, 20 pairs), 7,000 served 1.073 x the requests of 700
  (95 % interval 1.013 to 1.134).
- What only the collector frees now lives longer, so an answer must leave no reference cycle: a refused
  request's exception holding its own frame once kept about 400 MB of request bodies alive under a flood
  (tests/unit/test_heap.py checks 503, 404, 400 and 500 answers leave none).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD = 7000


def settle() -> None:
    """Collect, freeze what is alive, and set the young generation's threshold (the older two as they are)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
