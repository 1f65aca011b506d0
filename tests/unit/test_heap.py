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


async def test_refused_malformed_and_failed_requests_leave_nothing_for_the_collector():
    """With young collections every 7,000 objects, a cycle per refused request kept hundreds of request bodies
    alive under a flood (tests/integration/test_overload.py saw 400 MB): every answer must be freed by reference
    counting alone. 503 (queue full), 404, 400 (malformed, wrong shape) and 500 (the model raised)."""
    import asyncio

    import orjson

    from serving.http_api import infer_handler
    from serving.model_config import TensorSpec, make_config, spec_from_config
    from serving.options import ServingOptions
    from serving.service import InferenceService
    from test_grpc import _Worker

    worker = _Worker()
    held_model = worker.infer

    async def infer(version, inputs):
        if float(inputs["x"].ravel()[0]) == 7.0:
            raise RuntimeError("the model failed")
        return await held_model(version, inputs)

    worker.infer = infer
    cfg = make_config("m", [TensorSpec("x", "FP32", (1,))], [TensorSpec("y", "FP32", (1,))], max_batch_size=1,
                      max_queue_size=1, parameters={"fleet.max_inflight_batches": "1"})
    service = InferenceService({"m": (spec_from_config(cfg), cfg, worker)}, ServingOptions(repository="/nonexistent"))
    await service.refresh()
    handle = infer_handler(service)
    headers = [(b"content-type", b"application/json")]

    def body(*values):
        return orjson.dumps({"inputs": [{"name": "x", "shape": [1, len(values)], "datatype": "FP32",
                                         "data": list(values)}]})

    async def garbage_of(calls) -> tuple[list, list]:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            statuses = [(await handle(model, None, headers, data))[0] for model, data in calls]
            gc.collect()
        finally:
            gc.set_debug(0)
        found, gc.garbage[:] = list(gc.garbage), []
        return statuses, sorted({type(o).__name__ for o in found})

    try:
        worker.gate.clear()  # the model holds its batch: the queue (1) fills and the next request is refused
        held = [asyncio.ensure_future(handle("m", None, headers, body(0.5))) for _ in range(2)]  # running, queued
        await asyncio.sleep(0.05)
        statuses, found = await garbage_of([("m", body(0.5)), ("nope", body(0.5))] * 20)
        assert statuses == [503, 404] * 20 and found == [], found
        worker.gate.set()
        assert [r[0] for r in await asyncio.gather(*held)] == [200] * 2
        statuses, found = await garbage_of([("m", body(0.5, 1.0)), ("m", b"{not json"), ("m", body(7.0))] * 20)
        assert statuses == [400, 400, 500] * 20 and found == [], found
    finally:
        worker.gate.set()
        await service.close()
