"""serving.heap.settle: what start-up made is frozen, and young collections wait for YOUNG_THRESHOLD objects."""

import gc

from serving import heap


def test_settle_freezes_startup_and_spaces_young_collections():
    before = gc.get_threshold()
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    try:
        heap.settle()
        assert gc.get_freeze_count() > 1000  # this process's modules and objects, out of the collector's reach
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *before[1:])
        gc.callbacks.append(count)
        held = [[i] for i in range(heap.YOUNG_THRESHOLD // 2)]  # containers alive for a moment, as a request's
        assert collections == []  # Python's default (700) would have collected several times by now
        held += [[i] for i in range(heap.YOUNG_THRESHOLD)]
        assert collections and collections[0] == 0  # past the threshold the young generation is collected
        del held
    finally:
        if count in gc.callbacks:
            gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*before)
