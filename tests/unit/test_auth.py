"""Auth at the HTTP edge (serving/auth.py): digests only, constant-time compares, token-bucket maths, path checks."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import math
from pathlib import Path

import pytest

from cluster.config import FleetSettings
from serving import auth
from serving.auth import (ADMIN_OFF_MESSAGE, FORBIDDEN_MESSAGE, UNAUTHORIZED_MESSAGE, Guard, RateLimiter,
                          TokenBucket, as_digest, key_digest, parse_bearer)
from serving.errors import Forbidden, ModelNotFound, RateLimited, Unauthorized
from serving.model_config import TensorSpec, make_config
from serving.registry import SERVING_FILE, ModelRepository, ServingState, check_model_name


def _bearer(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"authorization", value)]


# -- digests: keys never kept ------------------------------------------------------------------


def test_a_key_is_kept_as_its_sha256_digest_and_a_digest_stays_one():
    digest = key_digest("s3cret")
    assert digest == "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    assert as_digest("s3cret") == digest
    assert as_digest(digest) == digest  # read twice (CLI, then supervisor): hashed once
    assert as_digest(digest.upper().replace("SHA256:", "sha256:")) == digest
    assert as_digest("sha256:not-hex") == key_digest("sha256:not-hex")  # not a digest: a key
    with pytest.raises(ValueError, match="must not be empty"):
        as_digest("  ")


def test_settings_take_keys_from_config_env_and_file_and_hold_only_digests(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setenv("FLEET_API_KEYS", "env-key-1, env-key-2,")
    monkeypatch.setenv("FLEET_ADMIN_TOKEN", "the-admin-token")
    settings = FleetSettings(api_keys_file=str(keys_file), rate_limit_rps=2.5)
    want = [key_digest(k) for k in ("env-key-1", "env-key-2", "file-key-1", "file-key-2")]
    assert settings.api_keys == want
    assert settings.admin_token == key_digest("the-admin-token")
    dumped = settings.model_dump_json()  # what `fleet up` hands its supervisor and writes to its state file
    for secret in ("env-key-1", "file-key-2", "the-admin-token"):
        assert secret not in dumped
    again = FleetSettings(**json.loads(dumped))
    assert again.api_keys == want and again.admin_token == settings.admin_token
    options = settings.serving_options()
    assert options.api_key_digests == tuple(want) and options.admin_token_digest == settings.admin_token
    assert options.rate_limit_rps == 2.5 and options.rate_limit_burst == 3  # default burst: one second's worth
    assert "the-admin-token" not in json.dumps(options.to_dict())


def test_settings_from_yaml_and_a_missing_keys_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "fleet.yaml").write_text("api_keys: [yaml-key]\nadmin_token: adm\nrate_limit_rps: 10\n"
                                         "rate_limit_burst: 4\n")
    monkeypatch.setenv("FLEET_CONFIG", str(tmp_path / "fleet.yaml"))
    monkeypatch.delenv("FLEET_API_KEYS", raising=False)
    monkeypatch.delenv("FLEET_ADMIN_TOKEN", raising=False)
    settings = FleetSettings()
    assert settings.api_keys == [key_digest("yaml-key")] and settings.serving_options().rate_limit_burst == 4
    with pytest.raises(ValueError, match="api_keys_file .*nope.txt.* cannot be read"):
        FleetSettings(api_keys_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="rate_limit_rps"):
        FleetSettings(rate_limit_rps=0)


# -- the Authorization header and the compare ------------------------------------------------------


@pytest.mark.parametrize("value, ok", [
    (b"Bearer k1", True), (b"bearer k1", True), (b"BEARER   k1 ", True),
    (b"Basic k1", False), (b"Bearer", False), (b"Bearer ", False), (b"k1", False), (b"Bearer k1 k2", False),
    (b"Bearer " + b"x" * 5000, False),
])
def test_parse_bearer_hashes_one_well_formed_key(value, ok):
    assert parse_bearer(_bearer(value)) == (hashlib.sha256(b"k1").digest() if ok else None)


def test_missing_malformed_and_unknown_credentials_get_the_same_401():
    guard = Guard([key_digest("k1"), key_digest("k2")], key_digest("adm"))
    answers = []
    for headers in ([], _bearer(b"Basic k1"), _bearer(b"Bearer nope"), _bearer(b"Bearer k1x")):
        with pytest.raises(Unauthorized) as caught:
            guard.inference(headers, ("10.0.0.1", 5000))
        answers.append((caught.value.status, caught.value.message))
    assert answers == [(401, UNAUTHORIZED_MESSAGE)] * 4
    guard.inference(_bearer(b"Bearer k2"))
    guard.inference(_bearer(b"Bearer adm"))  # the admin token is accepted wherever a key is


def test_admin_needs_the_admin_token_a_key_gets_403_and_no_token_configured_turns_admin_off():
    guard = Guard([key_digest("k1")], key_digest("adm"))
    guard.admin(_bearer(b"Bearer adm"))
    with pytest.raises(Forbidden, match=FORBIDDEN_MESSAGE):
        guard.admin(_bearer(b"Bearer k1"))
    for headers in ([], _bearer(b"Bearer wrong"), _bearer(b"Token adm")):
        with pytest.raises(Unauthorized, match="missing or invalid credentials"):
            guard.admin(headers)
    off = Guard([key_digest("k1")])
    for headers in ([], _bearer(b"Bearer k1"), _bearer(b"Bearer adm")):
        with pytest.raises(Forbidden, match=ADMIN_OFF_MESSAGE):
            off.admin(headers)
    assert Guard().inference_free and not Guard(admin_digest=key_digest("adm")).keys_required


def test_every_digest_is_compared_with_compare_digest_whichever_key_matched(monkeypatch):
    """No early exit: the first key, the last key and an unknown one cost the same compares."""
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = [f"key-{i}" for i in range(5)]
    guard = Guard([key_digest(k) for k in keys])
    for presented in (b"key-0", b"key-4", b"unknown"):
        calls.clear()
        try:
            guard.inference(_bearer(b"Bearer " + presented))
        except Unauthorized:
            assert presented == b"unknown"
        assert calls == [(32, 32)] * 5


# -- token buckets -----------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_one_token_per_interval_and_says_how_long_to_wait():
    bucket = TokenBucket(rate_per_s=2.0, burst=3, now_s=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token comes every 1/2 s
    assert bucket.take(100.25) == pytest.approx(0.25)  # half of it there already, nothing taken
    assert bucket.take(100.5) == 0.0
    assert bucket.take(101.0) == 0.0 and bucket.take(101.0) == pytest.approx(0.5)
    assert not bucket.idle_full(101.0) and bucket.idle_full(102.5)
    assert bucket.take(1000.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refills to the burst, no more
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 0.0)


def test_the_limiter_answers_429_with_a_whole_second_retry_after_per_client():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=0.4, burst=2, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(RateLimited) as caught:
        limiter.check("a")
    assert caught.value.status == 429 and caught.value.retry_after_s == math.ceil(1 / 0.4) == 3
    limiter.check("b")  # another client has its own bucket
    now[0] = 2.5
    limiter.check("a")


def test_the_limiter_keeps_at_most_max_clients_and_drops_idle_ones_first():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1.0, burst=1, max_clients=3, clock=lambda: now[0])
    for client in range(100):
        limiter.check(client)
        assert len(limiter) <= 3
    with pytest.raises(RateLimited):
        limiter.check(99)  # the newest are the ones kept
    now[0] = 10.0  # all refilled: a new client replaces an idle one, nothing is lost
    limiter.check("new")
    assert len(limiter) == 3


def test_without_keys_the_bucket_is_per_client_address():
    guard = Guard(limiter=RateLimiter(rate_per_s=0.001, burst=1))
    guard.inference([], ("10.0.0.1", 1))
    guard.inference([], ("10.0.0.2", 1))
    with pytest.raises(RateLimited):
        guard.inference([], ("10.0.0.1", 2))  # another port of the same address: the same client


# -- names from requests never leave the repository ----------------------------------------------

_EVIL = ["..", ".", "../fraud", "fraud/../../etc", "/etc/passwd", "a/b", "a\\b", "fraud\x00", "%2e%2e",
         "..%2f..%2fetc", "", " ", "a" * 129, "-rf", "fraud\n"]


@pytest.mark.parametrize("name", _EVIL)
def test_a_model_name_that_is_not_one_plain_component_is_refused(name):
    with pytest.raises(ModelNotFound, match="invalid model name"):
        check_model_name(name)


def test_serving_state_is_written_atomically_inside_the_model_folder_only(tmp_path):
    repo = ModelRepository(str(tmp_path / "repo"))
    config = make_config("m", [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8)
    repo.write_config("m", config)
    for name in _EVIL:
        with pytest.raises(ModelNotFound):
            repo.write_serving_state(name, ServingState(False))
    with pytest.raises(ModelNotFound, match="not in the repository"):
        repo.write_serving_state("other", ServingState(False))  # no config.pbtxt: not a model
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["config.pbtxt"]
    assert repo.serving_state("m") == ServingState()
    repo.write_serving_state("m", ServingState(False, (2, 1)))
    doc = json.loads((tmp_path / "repo" / "m" / SERVING_FILE).read_text())
    assert doc["loaded"] is False and doc["versions"] == [2, 1] and doc["updated_at"] > 0
    assert repo.serving_state("m") == ServingState(False, (1, 2))
    assert sorted(p.name for p in (tmp_path / "repo" / "m").iterdir()) == ["config.pbtxt", SERVING_FILE]  # no temp


@pytest.mark.parametrize("doc", ['{"loaded": "no"}', '{"versions": [0]}', '{"versions": ["1"]}', "[1]", "{"])
def test_a_broken_serving_json_is_a_repository_error_naming_the_file(tmp_path, doc):
    repo = ModelRepository(str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / SERVING_FILE).write_text(doc)
    with pytest.raises(Exception, match="m/serving.json"):
        repo.serving_state("m")


# -- nothing on the request path unpickles or evaluates ---------------------------------------------

_SERVING = Path(__file__).resolve().parents[2] / "serving"
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__", "torch.load", "np.load", "numpy.load", "yaml.load",
                 "yaml.unsafe_load", "pickle.loads", "pickle.load"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_serving_module_unpickles_or_evaluates_and_models_load_only_in_the_torchscript_backend():
    found = []
    for path in sorted(_SERVING.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                found.append((path.name, node.module))
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in _UNSAFE_CALLS:
                    found.append((path.name, name))
                elif name.endswith("jit.load") and path.relative_to(_SERVING).as_posix() != "backends/torchscript.py":
                    found.append((path.name, name))
    assert found == []


def test_served_versions_honour_an_unload_and_a_pin_among_accepted_versions(tmp_path):
    repo = ModelRepository(str(tmp_path))
    config = make_config("m", [TensorSpec("x", "FP32", (4,))], [TensorSpec("y", "FP32", (2,))], max_batch_size=8,
                         latest_versions=1)
    for version, gate in ((1, "accepted"), (2, "rejected"), (3, "accepted"), (4, "accepted")):
        repo.publish("m", {"model.pt": b"x"}, {"gate": gate}, config=config, version=version)
    assert repo.served_versions("m") == [4]
    repo.write_serving_state("m", ServingState(True, (1, 2, 3)))
    assert repo.served_versions("m") == [1, 3]  # a rejected version is never served, pinned or not
    repo.write_serving_state("m", ServingState(False, (1, 3)))
    assert repo.served_versions("m") == []
    repo.write_serving_state("m", ServingState(True, None))
    assert repo.served_versions("m") == [4]
