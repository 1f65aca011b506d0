"""KServe v2 over gRPC on the test cluster: `tritonclient.grpc` unmodified, the same answers, statistics and
prediction log as HTTP, streams, channels pinned to one ingress replica each, and a hostile corpus that gets
errors, never INTERNAL, UNKNOWN or a crash.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pyarrow.dataset as ds
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from integration._monitoring import metric_value, wait_until
from training.datasets import make_fraud

pytestmark = pytest.mark.integration

SERVICE = "/inference.GRPCInferenceService/"


def _features(x: np.ndarray) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("features", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _http_infer(base_url: str, model: str, x: np.ndarray, **extra) -> httpx.Response:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            **extra}
    return httpx.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=30)


def test_tritonclient_grpc_gets_what_http_gets(grpc_address, base_url):
    client = tgrpc.InferenceServerClient(grpc_address)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fraud")
        http_meta = httpx.get(f"{base_url}/v2/models/fraud", timeout=10).json()
        meta = client.get_model_metadata("fraud", as_json=True)
        assert meta["versions"] == http_meta["versions"] and meta["platform"] == http_meta["platform"]
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == \
            [(t["name"], t["datatype"], t["shape"]) for t in http_meta["inputs"]]
        assert client.get_model_config("fraud", as_json=True)["config"]["name"] == "fraud"
        served = {(m["name"], m.get("version")) for m in client.get_model_repository_index(as_json=True)["models"]}
        http_index = httpx.post(f"{base_url}/v2/repository/index", timeout=10).json()
        assert served == {(m["name"], m.get("version")) for m in http_index}

        before = client.get_inference_statistics("fraud", as_json=True)["model_stats"]
        x, _ = make_fraud(5, seed=21)
        result = client.infer("fraud", [_features(x)], request_id="grpc-same-as-http")
        got = result.as_numpy("probability")
        http = _http_infer(base_url, "fraud", x).json()
        want = np.asarray(http["outputs"][0]["data"], np.float32).reshape(got.shape)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        response = result.get_response()
        assert response.id == "grpc-same-as-http" and response.model_version == http["model_version"]

        def successes(stats) -> int:
            return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)

        # The gRPC and the HTTP request, counted alike (the other replica's counts arrive with its next push).
        deadline = time.monotonic() + 5
        while successes(client.get_inference_statistics("fraud", as_json=True)["model_stats"]) < \
                successes(before) + 2:
            assert time.monotonic() < deadline, "the statistics did not count both requests"
            time.sleep(0.2)

        with pytest.raises(InferenceServerException) as info:  # the message HTTP gives, the code it maps to
            client.infer("fraud", [_features(np.zeros((1, 29), np.float32))])
        http_error = _http_infer(base_url, "fraud", np.zeros((1, 29), np.float32))
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert info.value.message() == http_error.json()["error"] and http_error.status_code == 400
        with pytest.raises(InferenceServerException) as info:  # the deadline: the slow model's batch takes longer
            client.infer("slow", [_slow_input()], client_timeout=0.02)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()


def _slow_input() -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
    return tensor


def test_a_stream_answers_in_order_and_ends_each_answer_with_the_final_flag_when_asked(grpc_address):
    client = tgrpc.InferenceServerClient(grpc_address)
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    try:
        x, _ = make_fraud(20, seed=5)
        for i in range(20):
            client.async_stream_infer("fraud", [_features(x[i:i + 1])], request_id=f"stream-{i}",
                                      enable_empty_final_response=True)
        client.async_stream_infer("no_such_model", [_features(x[:1])], request_id="stream-bad")
        deadline = time.monotonic() + 30
        while len(answers) < 41 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.stop_stream()
        client.close()
    assert len(answers) == 41, answers[-3:]
    ids, finals = [], []
    for result, error in answers[:40]:
        assert error is None, error
        response = result.get_response()
        ids.append(response.id)
        finals.append(response.parameters["triton_final_response"].bool_param)
    assert ids == [f"stream-{i // 2}" for i in range(40)] and finals == [False, True] * 20
    assert answers[40][0] is None and "unknown model 'no_such_model'" in str(answers[40][1])


def _replica_of_each_row(data_dir: Path, model: str, ids: set[str], timeout_s: float = 20.0) -> dict[str, str]:
    """{request id: the replica whose prediction-log file holds it}, once every id of `ids` is logged."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {}
        for fragment in ds.dataset(data_dir / "traffic" / model, partitioning="hive").get_fragments():
            replica = Path(fragment.path).name.split("-")[1]  # <UTC time>-<replica>-<seq>.parquet
            for rid in fragment.to_table(columns=["request_id"])["request_id"].to_pylist():
                if rid in ids:
                    found[rid] = replica
        if len(found) == len(ids):
            return found
        time.sleep(0.5)
    raise AssertionError(f"{len(ids) - len(found)} of {len(ids)} gRPC requests are not in the prediction log")


def test_each_channel_stays_on_one_ingress_replica_and_every_request_is_logged(grpc_address, fleet_cluster):
    """gRPC balances per connection: the kernel spreads the channels' connections over the replicas (2 here), every
    call of a channel goes where its connection went. 16 channels all on one replica: 2 ** -15."""
    settings = fleet_cluster[0]
    run = uuid.uuid4().hex[:6]
    x, _ = make_fraud(1, seed=8)
    channels = {}
    for c in range(16):
        # A channel of its own connection: gRPC shares a subchannel (one TCP connection) between channels to the same
        # target from its global pool, so a new client could reuse the one just closed, and its replica.
        client = tgrpc.InferenceServerClient(grpc_address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        try:
            for k in range(5):
                client.infer("fraud", [_features(x)], request_id=f"chan-{run}-{c}-{k}")
        finally:
            client.close()
        channels[c] = [f"chan-{run}-{c}-{k}" for k in range(5)]
    where = _replica_of_each_row(Path(settings.data_dir), "fraud", {rid for ids in channels.values() for rid in ids})
    per_channel = {c: {where[rid] for rid in ids} for c, ids in channels.items()}
    assert all(len(replicas) == 1 for replicas in per_channel.values()), per_channel
    assert len(set().union(*per_channel.values())) == 2, per_channel


def _hostile_corpus(seed: int) -> list[tuple[str, bytes]]:
    """(what, serialized request) pairs: malformed protobuf, self-contradicting tensors, huge shapes, wrong
    datatypes, oversized messages, and seeded mutations of a valid request."""
    x = np.zeros((1, 30), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor

    def req(**kw) -> bytes:
        kw.setdefault("model_name", "fraud")
        return pb.ModelInferRequest(**kw).SerializeToString()

    valid = req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])], raw_input_contents=[x.tobytes()])
    corpus = [
        ("empty message", b""),
        ("garbage", b"\xff" * 64),
        ("truncated varint", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
        ("length past the end", b"\x0a\x7ffraud"),
        ("no inputs", req()),
        ("raw size disagrees with shape", req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                                             raw_input_contents=[x.tobytes()[:-4]])),
        ("typed count disagrees with shape", req(inputs=[tensor(name="features", datatype="FP32", shape=[2, 30],
                                                                contents=pb.InferTensorContents(fp32_contents=[0] * 30))])),
        ("huge declared shape", req(inputs=[tensor(name="features", datatype="FP32", shape=[1 << 62, 1 << 62])],
                                    raw_input_contents=[b""])),
        ("negative dimension", req(inputs=[tensor(name="features", datatype="FP32", shape=[-1, 30])],
                                   raw_input_contents=[x.tobytes()])),
        ("17 dimensions", req(inputs=[tensor(name="features", datatype="FP32", shape=[1] * 17)],
                              raw_input_contents=[b"\x00" * 4])),
        ("wrong datatype", req(inputs=[tensor(name="features", datatype="INT64", shape=[1, 30])],
                               raw_input_contents=[b"\x00" * 240])),
        ("unknown datatype", req(inputs=[tensor(name="features", datatype="FP128", shape=[1, 30])],
                                 raw_input_contents=[b"\x00" * 480])),
        ("more raw blobs than inputs", req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                                           raw_input_contents=[x.tobytes(), b"x"])),
        ("typed contents of the wrong kind", req(inputs=[tensor(
            name="features", datatype="FP32", shape=[1, 30], contents=pb.InferTensorContents(int64_contents=[1] * 30))])),
        ("BYTES with a lying length", req(inputs=[tensor(name="features", datatype="BYTES", shape=[1])],
                                          raw_input_contents=[b"\xff\xff\xff\x7f"])),
        ("unknown model", req(model_name="nope", inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                              raw_input_contents=[x.tobytes()])),
        ("path in the model name", req(model_name="../fraud", inputs=[tensor(name="features", datatype="FP32",
                                                                              shape=[1, 30])],
                                       raw_input_contents=[x.tobytes()])),
        ("version not a number", req(model_version="one", inputs=[tensor(name="features", datatype="FP32",
                                                                          shape=[1, 30])],
                                     raw_input_contents=[x.tobytes()])),
        ("oversized message", req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                                  raw_input_contents=[b"\x00" * (2 << 20)])),
        ("a bad timeout parameter", req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                                        raw_input_contents=[x.tobytes()],
                                        parameters={"timeout": pb.InferParameter(string_param="soon")})),
        ("classification asked", req(inputs=[tensor(name="features", datatype="FP32", shape=[1, 30])],
                                     raw_input_contents=[x.tobytes()],
                                     outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(
                                         name="probability",
                                         parameters={"classification": pb.InferParameter(int64_param=2)})])),
    ]
    rng = random.Random(seed)
    for i in range(300):
        data = bytearray(valid)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[:rng.randrange(len(data))]
        elif kind == 2:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 40))
        else:
            at = rng.randrange(len(data))
            data[at:at + rng.randint(1, 20)] = b""
        corpus.append((f"mutation {i}", bytes(data)))
    return corpus


def test_a_hostile_grpc_corpus_gets_errors_never_internal_and_the_cluster_stays_healthy(grpc_address, base_url):
    channel = grpc.insecure_channel(grpc_address)
    infer = channel.unary_unary(SERVICE + "ModelInfer")
    codes: dict[str, int] = {}
    bad = []
    try:
        for what, data in _hostile_corpus(seed=20261206):
            try:
                infer(data, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                    bad.append((what, code, exc.details()))
            codes[code.name] = codes.get(code.name, 0) + 1
    finally:
        channel.close()
    assert not bad, bad[:5]
    assert codes.get("INVALID_ARGUMENT", 0) > 100 and codes.get("RESOURCE_EXHAUSTED", 0) >= 1, codes
    client = tgrpc.InferenceServerClient(grpc_address)
    try:
        assert client.is_server_ready()
        x, _ = make_fraud(2, seed=3)
        assert client.infer("fraud", [_features(x)]).as_numpy("probability").shape == (2, 1)
    finally:
        client.close()
    assert httpx.get(f"{base_url}/v2/health/ready", timeout=10).status_code == 200
    # the native transport refused the oversized message before reading it, and says so in /metrics
    wait_until(lambda: (metric_value(httpx.get(f"{base_url}/metrics", timeout=30).text,
                                     "fleet_grpc_transport_events_total", event="calls_refused") or 0) >= 1,
               timeout_s=15, what="the transport's refused call in /metrics")


def test_the_readme_grpc_example_runs_as_written(grpc_address, capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- readme-grpc-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:8001"' in block
    exec(compile(block.replace("127.0.0.1:8001", grpc_address), "README.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("True [") and printed[-1].endswith(" order-17")
