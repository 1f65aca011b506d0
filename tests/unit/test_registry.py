"""The model repository (serving/registry.py) and config.pbtxt handling (serving/model_config.py).

A repository written by hand exactly as Triton's pytorch_libtorch backend wants
it must load unchanged; publishing must be atomic and leave no trace when refused.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from serving.backends.base import positional_order
from serving.backends.torchscript import TorchScriptBackend
from serving.errors import FleetError, ModelNotFound, RepositoryError
from serving.model_config import (
    TensorSpec,
    VersionPolicy,
    format_config,
    make_config,
    parse_config,
    spec_from_config,
)
from serving.registry import ModelRepository
from _scaled import model_bytes

# Written the way a Triton user writes it (text protobuf, Triton's own defaults left out).
TRITON_CONFIG = """
name: "linear"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "input__0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "output__0"
    data_type: TYPE_FP32
    dims: [ 2 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy {
    max_queue_size: 16
    default_timeout_microseconds: 5000
  }
}
version_policy: { specific: { versions: [1, 3] } }
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
"""


@pytest.fixture(scope="module")
def model_pt() -> dict[int, bytes]:
    return {v: model_bytes(float(v)) for v in (1, 2, 3)}


def write_triton_model(root, name: str, config_text: str, model_pt: dict[int, bytes]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config_text)
    for version, data in model_pt.items():
        (folder / str(version)).mkdir()
        (folder / str(version) / "model.pt").write_bytes(data)


def simple_config(name: str, **kw):
    return make_config(
        name,
        [TensorSpec("input__0", "FP32", (4,))],
        [TensorSpec("output__0", "FP32", (2,))],
        max_batch_size=kw.pop("max_batch_size", 8),
        **kw,
    )


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


# -- a Triton repository loads as it is ---------------------------------------------


def test_a_triton_pytorch_libtorch_repository_loads_as_is(tmp_path, model_pt):
    write_triton_model(tmp_path, "linear", TRITON_CONFIG, model_pt)
    repo = ModelRepository(str(tmp_path))
    assert repo.list_models() == ["linear"]
    spec = repo.spec("linear")
    assert (spec.name, spec.backend, spec.platform, spec.max_batch_size) == (
        "linear", "torchscript", "pytorch_libtorch", 8)
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [("input__0", "FP32", (4,))]
    assert [(t.name, t.datatype, t.dims) for t in spec.outputs] == [("output__0", "FP32", (2,))]
    assert spec.inputs[0].metadata(spec.max_batch_size) == {"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}
    assert spec.batching.enabled
    assert spec.batching.preferred_batch_sizes == (4, 8)
    assert spec.batching.max_queue_delay_us == 100
    assert spec.batching.queue.max_queue_size == 16
    assert spec.batching.queue.default_timeout_us == 5000
    assert spec.batching.queue.allow_timeout_override is False  # Triton's default when a policy is given
    assert (spec.instance_count, spec.instance_kind) == (2, "cpu")
    assert spec.default_model_filename == "model.pt"
    assert repo.list_versions("linear") == [1, 2, 3]
    assert repo.served_versions("linear") == [1, 3]
    assert repo.metadata("linear", 1) == {}  # a Triton repository has no fleet metadata
    info = repo.version("linear", 3)
    assert info.version == 3 and info.path.endswith("/linear/3")
    with pytest.raises(ModelNotFound, match="no published version 4"):
        repo.version("linear", 4)
    with pytest.raises(ModelNotFound, match="'missing' is not in the repository"):
        repo.spec("missing")


async def test_a_version_from_the_triton_repository_runs_with_torchscript(tmp_path, model_pt):
    write_triton_model(tmp_path, "linear", TRITON_CONFIG, model_pt)
    repo = ModelRepository(str(tmp_path))
    spec = repo.spec("linear")
    backend = TorchScriptBackend(spec, 3, repo.model_file("linear", 3), device="cpu")
    await backend.load()
    try:
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        out = await backend.infer({"input__0": x})
    finally:
        await backend.close()
    np.testing.assert_allclose(out["output__0"], 3.0 * (x[:, :2] + x[:, 2:]))  # version 3's weights
    assert out["output__0"].dtype == np.float32


@pytest.mark.parametrize(
    "policy, served",
    [
        ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
        ("version_policy: { latest: { num_versions: 5 } }", [1, 2, 3]),
        ("version_policy: { all: {} }", [1, 2, 3]),
        ("", [3]),  # Triton's default: the latest one
    ],
)
def test_version_policies_select_the_versions_served(tmp_path, model_pt, policy, served):
    text = TRITON_CONFIG.replace("version_policy: { specific: { versions: [1, 3] } }", policy)
    write_triton_model(tmp_path, "linear", text, model_pt)
    assert ModelRepository(str(tmp_path)).served_versions("linear") == served


def test_version_policy_select_directly():
    assert VersionPolicy("latest", 2).select([5, 1, 3, 3]) == [3, 5]
    assert VersionPolicy("specific", versions=(2, 9)).select([1, 2, 3]) == [2]
    assert VersionPolicy("all").select([3, 1]) == [1, 3]


def test_folders_that_are_not_published_versions_are_ignored(tmp_path, model_pt):
    write_triton_model(tmp_path, "linear", TRITON_CONFIG.replace(
        "version_policy: { specific: { versions: [1, 3] } }", "version_policy: { all: {} }"), model_pt)
    (tmp_path / "linear" / "7").mkdir()  # no model.pt in it (yet)
    (tmp_path / "linear" / ".staging-abc").mkdir()
    (tmp_path / "linear" / ".staging-abc" / "model.pt").write_bytes(model_pt[1])
    (tmp_path / "linear" / "notes").mkdir()
    (tmp_path / "stray").mkdir()  # a folder without config.pbtxt is not a model
    repo = ModelRepository(str(tmp_path))
    assert repo.list_models() == ["linear"]
    assert repo.served_versions("linear") == [1, 2, 3]


# -- publishing -------------------------------------------------------------------------


def test_publish_a_new_model_writes_config_files_and_metadata_in_one_version(tmp_path, model_pt):
    repo = ModelRepository(str(tmp_path / "repo"))
    metadata = {
        "auc": np.float32(0.75),
        "rows": np.int64(1000),
        "mean": np.array([0.5, 1.5], dtype=np.float32),
        "flags": np.array([True, False]),
        "parent": None,
    }
    number = repo.publish("fraud", {"model.pt": model_pt[1]}, metadata, config=simple_config("fraud"))
    assert number == 1
    folder = tmp_path / "repo" / "fraud"
    assert listing(folder) == ["1", "config.pbtxt"]  # no staging folder or temp file left
    # The completion marker too: not needed locally (the rename publishes), it keeps a copy on S3 served.
    assert listing(folder / "1") == ["_fleet_complete", "metadata.json", "model.pt"]
    assert json.loads((folder / "1" / "_fleet_complete").read_text())["files"] == ["metadata.json", "model.pt"]
    assert (folder / "1" / "model.pt").read_bytes() == model_pt[1]

    def no_constants(name):
        raise AssertionError(f"metadata.json holds {name}, which is not JSON")

    stored = json.loads((folder / "1" / "metadata.json").read_text(), parse_constant=no_constants)
    assert stored == {"auc": 0.75, "rows": 1000, "mean": [0.5, 1.5], "flags": [True, False], "parent": None}
    assert isinstance(stored["rows"], int)
    assert repo.metadata("fraud", 1) == stored
    assert repo.served_versions("fraud") == [1]
    assert repo.publish("fraud", {"model.pt": model_pt[2]}, {"auc": 0.8}) == 2
    assert repo.served_versions("fraud") == [2]  # make_config serves the latest one


def test_a_version_folder_never_appears_half_written(tmp_path):
    repo = ModelRepository(str(tmp_path))
    payload = os.urandom(4 << 20)
    repo.publish("big", {"model.pt": payload}, {}, config=simple_config("big"))
    folder = tmp_path / "big"
    seen_incomplete: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for entry in os.listdir(folder):
                if entry.isdigit():
                    try:
                        size = os.path.getsize(folder / entry / "model.pt")
                        has_metadata = (folder / entry / "metadata.json").exists()
                    except FileNotFoundError:
                        size, has_metadata = -1, False
                    if size != len(payload) or not has_metadata:
                        seen_incomplete.append(entry)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        numbers = [repo.publish("big", {"model.pt": payload}, {"i": i}) for i in range(6)]
    finally:
        stop.set()
        watcher.join()
    assert numbers == [2, 3, 4, 5, 6, 7]
    assert seen_incomplete == []
    assert not [e for e in os.listdir(folder) if e.startswith(".")]


def test_concurrent_publishes_get_distinct_numbers_and_keep_their_own_files(tmp_path):
    repo = ModelRepository(str(tmp_path))
    repo.publish("fraud", {"model.pt": b"first"}, {}, config=simple_config("fraud"))
    results: dict[int, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def publish(i: int) -> None:
        try:
            barrier.wait()
            results[i] = repo.publish("fraud", {"model.pt": f"model-{i}".encode()}, {"publisher": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results.values()) == list(range(2, 14))
    for i, number in results.items():
        assert (tmp_path / "fraud" / str(number) / "model.pt").read_bytes() == f"model-{i}".encode()
        assert repo.metadata("fraud", number) == {"publisher": i}
    assert repo.list_versions("fraud") == list(range(1, 14))
    assert not [e for e in os.listdir(tmp_path / "fraud") if e.startswith(".")]


def test_an_existing_version_is_immutable_and_a_refused_publish_changes_nothing(tmp_path):
    repo = ModelRepository(str(tmp_path))
    repo.publish("fraud", {"model.pt": b"v1"}, {"auc": 0.7}, config=simple_config("fraud"))
    config_before = (tmp_path / "fraud" / "config.pbtxt").read_text()
    with pytest.raises(RepositoryError, match="version 1 exists and is immutable"):
        repo.publish("fraud", {"model.pt": b"other"}, {"auc": 0.1}, version=1,
                     config=simple_config("fraud", max_batch_size=32))
    assert (tmp_path / "fraud" / "1" / "model.pt").read_bytes() == b"v1"
    assert repo.metadata("fraud", 1) == {"auc": 0.7}
    assert (tmp_path / "fraud" / "config.pbtxt").read_text() == config_before  # the config was not replaced
    assert listing(tmp_path / "fraud") == ["1", "config.pbtxt"]
    # A free explicit number is taken as asked.
    assert repo.publish("fraud", {"model.pt": b"v5"}, {}, version=5) == 5
    assert repo.list_versions("fraud") == [1, 5]
    with pytest.raises(RepositoryError, match="positive integer"):
        repo.publish("fraud", {"model.pt": b"v0"}, {}, version=0)
    assert listing(tmp_path / "fraud") == ["1", "5", "config.pbtxt"]


@pytest.mark.parametrize(
    "files, metadata, config, match",
    [
        ({"model.pt": b"x"}, {"auc": float("nan")}, "good", "not strict JSON"),
        ({"model.pt": b"x"}, {"auc": np.float32("inf")}, "good", "not strict JSON"),
        ({"model.pt": b"x"}, {"when": object()}, "good", "not strict JSON"),
        ({"../model.pt": b"x"}, {}, "good", "invalid file name"),
        ({"metadata.json": b"{}"}, {}, "good", "invalid file name"),
        ({"model.pt": b"x"}, {}, "bad", "at least one input"),
        ({"model.pt": b"x"}, {}, None, "has no config.pbtxt"),
    ],
)
def test_a_refused_publish_of_a_new_model_leaves_nothing_behind(tmp_path, files, metadata, config, match):
    repo = ModelRepository(str(tmp_path))
    if config == "good":
        config = simple_config("fraud")
    elif config == "bad":
        config = simple_config("fraud")
        del config.input[:]
    with pytest.raises(RepositoryError, match=match):
        repo.publish("fraud", files, metadata, config=config)
    assert listing(tmp_path) == []


# -- bad configs ---------------------------------------------------------------------------


def _without(text: str, block: str) -> str:
    assert block in text
    return text.replace(block, "")


_INPUT_BLOCK = TRITON_CONFIG[TRITON_CONFIG.index("input ["):TRITON_CONFIG.index("output [")]


@pytest.mark.parametrize(
    "text, match",
    [
        (TRITON_CONFIG.replace('name: "linear"', 'name: "other"'), "name 'other' does not match the model folder 'linear'"),
        (_without(TRITON_CONFIG, _INPUT_BLOCK), "at least one input and one output"),
        (TRITON_CONFIG.replace('"pytorch_libtorch"', '"tensorflow_savedmodel"'), "'tensorflow_savedmodel'.*not served by fleet"),
        (TRITON_CONFIG.replace('platform: "pytorch_libtorch"', 'backend: "onnxruntime"'), "'onnxruntime' is not served"),
        (TRITON_CONFIG + 'parameters { key: "fleet.backend" value: { string_value: "triton" } }', "fleet.triton.url"),
        (TRITON_CONFIG + 'parameters { key: "fleet.backend" value: { string_value: "onnx" } }', "must be 'torchscript' or 'triton'"),
        (TRITON_CONFIG.replace("dims: [ 4 ]", "dims: [ 0 ]"), "'input__0'.*dims must be positive or -1"),
        (TRITON_CONFIG.replace("dims: [ 2 ]", "dims: [ -2 ]"), "'output__0'.*dims must be positive or -1"),
        (TRITON_CONFIG.replace("preferred_batch_size: [ 4, 8 ]", "preferred_batch_size: [ 4, 16 ]"), "preferred_batch_size \\[4, 16\\] must lie in 1..max_batch_size \\(8\\)"),
        (TRITON_CONFIG.replace("data_type: TYPE_FP32\n    dims: [ 4 ]", "data_type: TYPE_BF16\n    dims: [ 4 ]"), "'input__0'.*unsupported tensor data type 'TYPE_BF16'"),
        (TRITON_CONFIG.replace("max_batch_size: 8", "max_batch_size: eight"), "linear/config.pbtxt:.*"),
        (TRITON_CONFIG + 'parameters { key: "fleet.worker.prefer_labels" value: { string_value: "fleet-role" } }',
         "'fleet.worker.prefer_labels' must be 'key=value,...', got 'fleet-role'"),
        (TRITON_CONFIG + 'parameters { key: "fleet.breaker.failures" value: { string_value: "0" } }',
         "'fleet.breaker.failures' must be a positive number"),
    ],
)
def test_a_bad_config_is_a_repository_error_that_names_the_problem(tmp_path, model_pt, text, match):
    write_triton_model(tmp_path, "linear", text, {1: model_pt[1]})
    repo = ModelRepository(str(tmp_path))
    with pytest.raises(RepositoryError, match=match) as info:
        repo.spec("linear")
    assert str(info.value).startswith("linear/config.pbtxt")
    assert isinstance(info.value, FleetError)


def test_duplicate_tensor_names_are_refused():
    config = simple_config("dup")
    config.input.add().CopyFrom(config.input[0])
    with pytest.raises(RepositoryError, match="duplicate input names"):
        spec_from_config(config, name="dup")


def test_write_config_refuses_an_invalid_config_and_keeps_the_old_one(tmp_path):
    repo = ModelRepository(str(tmp_path))
    repo.write_config("fraud", simple_config("fraud"))
    before = (tmp_path / "fraud" / "config.pbtxt").read_text()
    bad = simple_config("fraud", preferred_batch_sizes=(64,))
    with pytest.raises(RepositoryError, match="preferred_batch_size"):
        repo.write_config("fraud", bad)
    assert (tmp_path / "fraud" / "config.pbtxt").read_text() == before
    assert listing(tmp_path / "fraud") == ["config.pbtxt"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".", ".hidden", "x" * 129, "a\\b", "a b"])
def test_invalid_model_names_are_refused_everywhere(tmp_path, name):
    repo = ModelRepository(str(tmp_path / "repo"))
    with pytest.raises(ModelNotFound, match="invalid model name"):
        repo.spec(name)
    with pytest.raises(ModelNotFound, match="invalid model name"):
        repo.publish(name, {"model.pt": b"x"}, {}, config=simple_config("x"))
    assert listing(tmp_path) == []  # nothing written, inside the repository or beside it


# -- round trips and backend selection ----------------------------------------------------


def test_a_written_config_round_trips(tmp_path):
    config = simple_config(
        "fraud",
        max_queue_delay_us=250,
        preferred_batch_sizes=(8, 16),
        max_batch_size=32,
        max_queue_size=64,
        default_timeout_us=1000,
        instance_count=3,
        instance_kind="KIND_GPU",
        latest_versions=2,
        parameters={"fleet.max_inflight_batches": "4"},
    )
    text = format_config(config)
    assert parse_config(text) == config
    repo = ModelRepository(str(tmp_path))
    repo.write_config("fraud", config)
    assert repo.config_proto("fraud") == config
    spec = repo.spec("fraud")
    assert spec == spec_from_config(parse_config(text), name="fraud")
    assert spec.batching.preferred_batch_sizes == (8, 16) and spec.batching.max_queue_delay_us == 250
    assert spec.batching.queue.allow_timeout_override is True
    assert (spec.instance_count, spec.instance_kind) == (3, "gpu")
    assert spec.version_policy == VersionPolicy("latest", 2)
    assert spec.parameters["fleet.max_inflight_batches"] == "4"
    # The hand-written Triton text survives a format/parse cycle too.
    assert parse_config(format_config(parse_config(TRITON_CONFIG))) == parse_config(TRITON_CONFIG)


def _params(**params) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


@pytest.mark.parametrize(
    "header, expected",
    [
        ('platform: "pytorch_libtorch"', "torchscript"),
        ('backend: "pytorch"', "torchscript"),
        ("", "torchscript"),  # neither set: fleet's own default
        ('platform: "onnxruntime_onnx"\n' + _params(**{"fleet.triton.url": "localhost:8001"}), "triton"),
        ('platform: "pytorch_libtorch"\n' + _params(**{"fleet.triton.url": "localhost:8001"}), "triton"),
        ('platform: "pytorch_libtorch"\n'
         + _params(**{"fleet.backend": "torchscript", "fleet.triton.url": "localhost:8001"}), "torchscript"),
        ('backend: "python"\n' + _params(**{"fleet.backend": "triton", "fleet.triton.url": "t:8001"}), "triton"),
    ],
)
def test_backend_selection(header, expected):
    text = header + """
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""
    spec = spec_from_config(parse_config(text), name="m")
    assert spec.backend == expected
    if expected == "triton":
        assert spec.triton_url


def test_a_triton_fronted_model_needs_only_its_config(tmp_path):
    text = TRITON_CONFIG.replace('platform: "pytorch_libtorch"', 'platform: "onnxruntime_onnx"').replace(
        "version_policy: { specific: { versions: [1, 3] } }", ""
    ) + _params(**{"fleet.triton.url": "localhost:8001"})
    (tmp_path / "linear").mkdir()
    (tmp_path / "linear" / "config.pbtxt").write_text(text)
    repo = ModelRepository(str(tmp_path))
    assert repo.spec("linear").backend == "triton"
    assert repo.spec("linear").triton_url == "localhost:8001"
    assert repo.served_versions("linear") == [1]


def test_positional_order_follows_the_index_not_the_text():
    specs = tuple(TensorSpec(f"input__{i}", "FP32", (1,)) for i in (10, 2, 0, 1))
    assert [t.name for t in positional_order(specs)] == ["input__0", "input__1", "input__2", "input__10"]
    mixed = (TensorSpec("b", "FP32", (1,)), TensorSpec("input__0", "FP32", (1,)), TensorSpec("a", "FP32", (1,)))
    assert [t.name for t in positional_order(mixed)] == ["b", "input__0", "a"]  # config order kept


def test_worker_replicas_may_prefer_labelled_nodes():
    from serving.model_config import node_labels

    # fleet.worker.prefer_labels: a Ray label selector the worker replicas prefer (serving/app.py)
    assert node_labels("fleet-role=worker, zone = a") == {"fleet-role": "worker", "zone": "a"}
    with pytest.raises(RepositoryError, match="names no label"):
        node_labels(" , ")
