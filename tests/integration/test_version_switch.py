"""A running cluster picks up a newly published, accepted version in place, under load, without a failed request.

For a colocated model (it runs in every ingress replica) and a split one (its own
worker deployment): clients keep sending requests to the model's default route
while version 2 (fraud's file with other weights) is published into the
repository. Within 30 s every response names version 2 and carries version 2's
answers, none fails, version 1 stays reachable by its URL (these models serve
the latest 2), and a version 3 the training gate rejected is never served. With
the default policy (latest 1, `fraud_roll_one`) version 1 leaves the served set
instead: the requests already on their way to it still succeed.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import torch

from training.datasets import make_fraud
from training.preprocess_reference import standardize

pytestmark = pytest.mark.integration

SWITCH_BOUND_S = 30.0  # what a user is promised
STABLE_S = 3.0  # after the last answer from version 1, this long of answers from version 2 only
CLIENTS = 4
ROWS = 4


@dataclass
class _Load:
    """Closed-loop clients on one URL, each recording (sent, done, model_version) or a failure."""

    url: str
    body: dict
    answers: list[tuple[float, float, str, list]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "_Load":
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()
        return self

    def _client(self) -> None:
        while not self.stop.is_set():
            # A new connection now and then, so the clients reach every ingress replica (SO_REUSEPORT).
            with httpx.Client(timeout=30) as client:
                for _ in range(25):
                    if self.stop.is_set():
                        return
                    sent = time.monotonic()
                    try:
                        r = client.post(self.url, json=self.body)
                    except Exception as exc:  # noqa: BLE001 - every failure counts
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    done = time.monotonic()
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text}")
                        continue
                    doc = r.json()
                    self.answers.append((sent, done, doc["model_version"], doc["outputs"][0]["data"]))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _perturbed(model_file: bytes, seed: int) -> tuple[bytes, torch.jit.ScriptModule]:
    """The same TorchScript with other weights: a "retrained" version whose answers differ."""
    module = torch.jit.load(io.BytesIO(model_file)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue(), module


def _expected(module, x: np.ndarray, metadata: dict, clip: float) -> list:
    with torch.inference_mode():
        return module(torch.from_numpy(standardize(x, metadata, clip))).numpy().ravel().tolist()


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=30)


@pytest.mark.parametrize("model, served", [("fraud_roll", ["1", "2"]), ("fraud_roll_split", ["1", "2"]),
                                           ("fraud_roll_one", ["2"])])
def test_a_published_version_is_served_within_30_s_with_no_failed_request(base_url, repository, repository_models,
                                                                         fleet_cluster, model, served):
    repo = repository_models
    poll_s = fleet_cluster[0].version_poll_interval_s
    x, _ = make_fraud(ROWS, seed=11)
    body = {"inputs": [{"name": "features", "shape": [ROWS, 30], "datatype": "FP32", "data": x.ravel().tolist()}]}
    metadata = repo.metadata(model, 1)
    clip = float(repo.spec(model).parameters["preprocess.clip"])
    v1_file = (repository / model / "1" / "model.pt").read_bytes()
    v1_answer = _expected(torch.jit.load(io.BytesIO(v1_file)).eval(), x, metadata, clip)
    v2_file, v2_module = _perturbed(v1_file, seed=2)
    v2_answer = _expected(v2_module, x, metadata, clip)
    assert not np.allclose(v1_answer, v2_answer, atol=1e-3)  # a client can tell the versions apart
    assert repo.served_versions(model) == [1]

    load = _Load(f"{base_url}/v2/models/{model}/infer", body).start()
    try:
        time.sleep(0.5)  # answers from version 1 before the publish (four closed-loop clients send dozens)
        published = time.monotonic()
        assert repo.publish(model, {"model.pt": v2_file}, {**metadata, "parent": 1, "gate": "accepted"}) == 2
        # Run until version 2 alone has answered for STABLE_S (or the promise is broken).
        while time.monotonic() < published + SWITCH_BOUND_S + STABLE_S and not load.failures:
            time.sleep(0.25)
            last_v1 = max((done for _, done, v, _ in list(load.answers) if v == "1"), default=published)
            if time.monotonic() - max(last_v1, published) > STABLE_S and any(
                    v == "2" for _, _, v, _ in list(load.answers)):
                break
        answers = list(load.answers)
        last_v1 = max(done for _, done, v, _ in answers if v == "1")
        switch_s = max(0.0, last_v1 - published)
        print(f"\n{model}: every response names version 2 {switch_s:.2f} s after publishing "
              f"({len(answers)} requests so far, {len(load.failures)} failed)")
        assert not load.failures, load.failures[:5]
        assert switch_s <= SWITCH_BOUND_S, f"version 1 still answered {switch_s:.1f} s after version 2 was published"
        before = [(v, data) for sent, _, v, data in answers if sent < published]
        assert before and all(v == "1" for v, _ in before)
        after = [(v, data) for sent, _, v, data in answers if sent > last_v1]
        assert len(after) >= 10 and all(v == "2" for v, _ in after)
        # Each response names the version that computed it.
        for _, _, v, data in answers:
            np.testing.assert_allclose(data, v1_answer if v == "1" else v2_answer, rtol=1e-5, atol=1e-6)

        r = _post(base_url, f"/v2/models/{model}/versions/1/infer", body)
        if "1" in served:
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], v1_answer, rtol=1e-5, atol=1e-6)
        else:
            assert r.status_code == 404 and "no version 1 being served" in r.json()["error"], r.text

        # A candidate the gate rejected is published, and never served.
        rejected = time.monotonic()
        v3_file, _ = _perturbed(v1_file, seed=3)
        assert repo.publish(model, {"model.pt": v3_file}, {**metadata, "parent": 2, "gate": "rejected"}) == 3
        time.sleep(1.2 * poll_s + 2.0 + 1.5)  # a poll (with jitter), the ingress's status refresh, and a margin
        r = _post(base_url, f"/v2/models/{model}/versions/3/infer", body)
        assert 400 <= r.status_code < 500 and "no version 3 being served" in r.json()["error"], r.text
        meta = httpx.get(f"{base_url}/v2/models/{model}", timeout=10).json()
        assert meta["versions"] == served
    finally:
        load.finish()
    assert not load.failures, load.failures[:5]
    answers = list(load.answers)
    assert {v for _, _, v, _ in answers} == {"1", "2"}
    while_rejected = [v for sent, _, v, _ in answers if sent > rejected]
    assert len(while_rejected) >= 10 and set(while_rejected) == {"2"}
