"""The Triton backend's readiness check (serving/backends/triton.py): a real closed port, and a stand-in
client for the one fault a test cannot cause on demand, a single slow answer from a serving Triton."""

from __future__ import annotations

import asyncio

from cluster.ports import free_port
from serving.backends.triton import TritonBackend
from serving.model_config import TensorSpec, make_config, spec_from_config


def _backend(port: int) -> TritonBackend:
    config = make_config("t", [TensorSpec("x", "FP32", (1,))], [TensorSpec("y", "FP32", (1,))], max_batch_size=4,
                         platform="", parameters={"fleet.backend": "triton", "fleet.triton.url": f"127.0.0.1:{port}"})
    return TritonBackend(spec_from_config(config), 1, connect_timeout_s=0.1)


class _Answers:
    """is_model_ready answering from a script: True, or an exception to raise."""

    def __init__(self, *answers):
        self.answers = list(answers)

    async def is_model_ready(self, model, version):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_triton_that_is_not_there_reads_down_from_the_start():
    backend = _backend(free_port())
    await backend.load()  # does not raise: the replica starts, the model reads not ready
    assert "has no ready model" in (await backend.health(max_age_s=0))
    await backend.close()


def test_one_failed_check_of_a_serving_model_does_not_make_it_unready_two_in_a_row_do():
    async def run():
        backend = _backend(1)
        backend._client = _Answers(True, asyncio.TimeoutError(), True, asyncio.TimeoutError(), ConnectionError("x"))
        seen = [await backend.health(max_age_s=0) for _ in range(5)]
        return seen

    seen = asyncio.run(run())
    assert seen[:4] == [None, None, None, None]
    assert seen[4] is not None and "ConnectionError" in seen[4]
