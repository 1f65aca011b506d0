"""Per-batch preprocessing declared in config.pbtxt: what the model gets, what is refused, what is counted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.batching import Batcher, BatcherConfig
from serving.errors import InvalidInput, RepositoryError
from serving.metrics import StatsRecorder
from serving.model_config import TensorSpec, make_config, spec_from_config
from serving.preprocess import ImageResize, Standardize, make_preprocessor

NAMES = ["a", "b", "c"]


def _metadata(mean=(1.0, -2.0, 0.0), std=(2.0, 0.5, 0.0)) -> dict:
    edges = [list(np.linspace(-4, 4, 9)) for _ in NAMES]
    return {"feature_names": NAMES,
            "reference_stats": {n: {"mean": m, "std": s, "edges": e, "counts": [0] * 8}
                                for n, m, s, e in zip(NAMES, mean, std, edges)}}


def _spec(params: dict, inputs=None, name: str = "m"):
    inputs = inputs or [TensorSpec("x", "FP32", (3,))]
    config = make_config(name, inputs, [TensorSpec("y", "FP32", (1,))], max_batch_size=64, parameters=params)
    return spec_from_config(config, name=name)


def test_standardize_uses_the_versions_statistics_and_guards_a_constant_feature():
    pre = make_preprocessor(_spec({"preprocess": "standardize", "preprocess.clip": "3"}), _metadata())
    assert isinstance(pre, Standardize)
    x = np.array([[3.0, -1.0, 7.0], [1.0, -10.0, -0.5]], np.float32)
    out, errors = pre.assemble([x[:1], x[1:]])
    # (3-1)/2 = 1, (-1+2)/0.5 = 2, 7/1 (std 0 counts as 1) = 7 -> clipped to 3; row 2: 0, -16 -> -3, -0.5
    np.testing.assert_allclose(out, [[1.0, 2.0, 3.0], [0.0, -3.0, -0.5]], rtol=1e-6)
    assert errors == [None, None]


def test_standardize_refuses_only_the_request_whose_row_holds_nan_or_inf():
    pre = make_preprocessor(_spec({"preprocess": "standardize"}), _metadata())
    good = np.zeros((2, 3), np.float32)
    bad = np.array([[0, 0, 0], [0, np.inf, 0]], np.float32)
    _, errors = pre.assemble([good, bad, good])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], InvalidInput) and "row 1" in str(errors[1]) and "finite" in str(errors[1])


def test_standardize_counts_every_feature_into_the_reference_bins_with_under_and_overflow():
    pre = make_preprocessor(_spec({"preprocess": "standardize"}), _metadata())
    seen = []
    pre.on_counts = seen.append
    x = np.array([[-5.0, 0.5, 4.0], [3.9, -4.0, 100.0]], np.float32)
    pre.assemble([x])
    counts = seen[0]
    assert counts.shape == (3, 10) and counts.sum() == 6
    assert counts[0, 0] == 1 and counts[0, 8] == 1  # -5 below the first edge; 3.9 in the last bin
    assert counts[2, 9] == 1 and counts[2, 8] == 1  # 100 above the last edge; 4.0 (the last edge) in the last bin
    assert counts[1, 5] == 1 and counts[1, 1] == 1  # 0.5 in [0, 1) (bin 4); -4.0 (the first edge) in bin 0


@pytest.mark.parametrize("params, metadata, phrase", [
    ({"preprocess": "whiten"}, {}, "must be one of"),
    ({"preprocess": "standardize"}, {}, "feature_names"),
    ({"preprocess": "standardize", "preprocess.clip": "-1"}, _metadata(), "preprocess.clip"),
    ({"preprocess": "image", "preprocess.size": "8,8"}, {}, "UINT8"),
])
def test_a_bad_declaration_is_a_repository_error_saying_what_is_wrong(params, metadata, phrase):
    with pytest.raises(RepositoryError, match=phrase):
        make_preprocessor(_spec(params), metadata)


def _image_spec(**params):
    return _spec({"preprocess": "image", "preprocess.size": "8,8", "preprocess.mean": "0.5",
                  "preprocess.std": "0.25", **params}, inputs=[TensorSpec("image", "UINT8", (-1, -1))])


def test_images_of_any_size_become_one_normalised_batch_as_torch_would_make_it():
    pre = make_preprocessor(_image_spec(), None)
    assert isinstance(pre, ImageResize) and pre.heavy
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 5, 13), dtype=np.uint8)
    assert pre.signature(a) == pre.signature(b)
    out, errors = pre.assemble([a, b])
    assert out.shape == (3, 1, 8, 8) and out.dtype == np.float32 and errors == [None, None]
    for i, img in enumerate([a[0], b[0], b[1]]):
        ref = F.interpolate(torch.from_numpy(img).float()[None, None], size=(8, 8), mode="bilinear",
                            align_corners=False)[0].numpy()
        np.testing.assert_allclose(out[i], (ref / 255 - 0.5) / 0.25, atol=1e-4)


def test_an_empty_or_huge_image_is_refused_before_it_is_queued():
    pre = make_preprocessor(_image_spec(), None)
    with pytest.raises(InvalidInput, match="each side"):
        pre.check(np.zeros((1, 0, 4), np.uint8))
    with pytest.raises(InvalidInput, match="each side"):
        pre.check(np.zeros((1, 5000, 2), np.uint8))
    pre.check(np.zeros((1, 3, 3), np.uint8))


async def test_the_batcher_runs_the_preprocessed_batch_and_answers_each_request_its_rows():
    pre = make_preprocessor(_spec({"preprocess": "standardize"}), _metadata(mean=(0, 0, 0), std=(1, 1, 1)))
    recorder = StatsRecorder()
    pre.on_counts = lambda counts: recorder.features("m", "1", counts)
    seen = []

    async def execute(inputs):
        seen.append(inputs["x"].copy())
        await asyncio.sleep(0.002)
        return {"y": inputs["x"].sum(axis=1, keepdims=True)}

    batcher = Batcher("m:1", execute, BatcherConfig(max_batch_size=64, max_queue_delay_us=2000), preprocess=pre)

    async def one(v: float):
        x = np.full((1, 3), v, np.float32)
        return (await batcher.submit({"x": x}, 1)).outputs["y"][0, 0]

    good = [asyncio.ensure_future(one(float(i))) for i in range(8)]
    bad = asyncio.ensure_future(batcher.submit({"x": np.array([[np.nan, 0, 0]], np.float32)}, 1))
    more = [asyncio.ensure_future(one(float(i))) for i in range(8, 12)]
    answers = await asyncio.gather(*good, *more)
    with pytest.raises(InvalidInput, match="NaN"):
        await bad
    await batcher.close()
    # clip at 10 (the default): 3 * min(v, 10)
    assert answers == [3.0 * min(i, 10) for i in range(12)]
    assert len(seen) < 13 and max(len(b) for b in seen) > 1
    counts = recorder.take()[("m", "1")].feature_counts
    assert len(counts) == 3 and sum(counts[1]) == 13  # every row counted, the refused one too


async def test_a_batch_whose_every_request_is_refused_does_not_run():
    pre = make_preprocessor(_spec({"preprocess": "standardize"}), _metadata())
    calls = []

    async def execute(inputs):
        calls.append(1)
        return {"y": inputs["x"][:, :1]}

    batcher = Batcher("m:1", execute, BatcherConfig(max_batch_size=8), preprocess=pre)
    with pytest.raises(InvalidInput):
        await batcher.submit({"x": np.array([[np.inf, 0, 0]], np.float32)}, 1)
    await batcher.close()
    assert calls == []


async def test_the_torchscript_backend_of_an_image_model_warms_up_on_what_preprocessing_hands_it(tmp_path):
    from serving.backends.torchscript import TorchScriptBackend
    from serving.preprocess import model_inputs
    from serving.registry import ModelRepository
    from training.digits import DigitsParams, bootstrap_digits

    # The published digits config and a model file of its shapes are what this needs, not an accurate model.
    bootstrap_digits(str(tmp_path), params=DigitsParams(epochs=1), num_threads=1, log=lambda line: None)
    repo = ModelRepository(str(tmp_path))
    spec = repo.spec("digits")
    assert [(t.datatype, t.dims) for t in model_inputs(spec)] == [("FP32", (1, 8, 8))]
    backend = TorchScriptBackend(spec, 1, repo.model_file("digits", 1), threads=1)
    await backend.load()  # the warm-up runs float32 [n, 1, 8, 8], not the clients' uint8 images
    pre = make_preprocessor(spec, None)
    batch, _ = pre.assemble([np.full((2, 30, 30), 255, np.uint8)])
    out = await backend.infer({"image": batch})
    assert out["probabilities"].shape == (2, 10)
