"""Fuzzing the running cluster: no input gets a 5xx, drops a connection or hurts the cluster.

(a) schemathesis against the document fleet serves at /openapi.json: positive and negative cases
    of every operation, each answer checked for server errors, its documented status, content type
    and schema. The model and version path parameters are narrowed (in this test's copy of the
    document only) to served models plus one unknown, so that the cases reach the models.
(b) a byte-level fuzz of POST /v2/models/fraud/infer: seeded mutations of valid JSON and binary
    tensor bodies (bit flips, truncation, splices, huge numbers, deep nesting, wrong
    Inference-Header-Content-Length values, random Content-Encoding) over a few keep-alive
    connections. Every request gets a whole answer below 500; a connection ends only where the
    server closed it after an answer. Afterwards the cluster is ready and answers correctly.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
import zlib
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

pytestmark = pytest.mark.integration

SEED = 20261202
_MODELS = ["fraud", "digits", "no_such_model"]
_VERSIONS = ["1", "2", "x"]
_EXAMPLES = 16  # per operation; the two infer operations get ten times as many


def _narrowed(doc: dict) -> dict:
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"] == "model":
                    param["schema"] = {"type": "string", "enum": _MODELS}
                elif param["in"] == "path" and param["name"] == "version":
                    param["schema"] = {"type": "string", "enum": _VERSIONS}
    return doc


def test_schemathesis_finds_no_server_error_and_every_answer_matches_the_document(base_url):
    doc = httpx.get(f"{base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_narrowed(doc))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in doc["paths"].values())
    session = requests.Session()
    failures: list[str] = []
    cases = 0
    start = time.monotonic()
    for op in operations:
        strategies = [op.as_strategy(GenerationMode.POSITIVE)]
        if op.path_parameters or op.body or op.headers:  # something to make invalid
            strategies.append(op.as_strategy(GenerationMode.NEGATIVE))
        # "Not ready" is what a ready endpoint's 503 means: documented, not a server error.
        ready = op.path.endswith("/ready")
        checks = [response_schema_conformance, status_code_conformance, content_type_conformance]

        @settings(max_examples=_EXAMPLES * (10 if op.path.endswith("/infer") else 1), deadline=None,
                  derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def run(case):
            nonlocal cases
            cases += 1
            response = case.call(base_url=base_url, session=session, timeout=30)
            try:
                case.validate_response(response, checks=checks if ready else [not_a_server_error, *checks])
            except (AssertionError, BaseExceptionGroup) as exc:  # noqa: PERF203 - collected, reported together
                failures.append(f"{op.label}: {exc}"[:1500])

        run()
    elapsed = time.monotonic() - start
    assert not failures, f"{len(failures)} failures in {cases} cases:\n" + "\n".join(failures[:5])
    assert cases >= 300, cases
    print(f"schemathesis: {cases} cases over {len(operations)} operations in {elapsed:.1f} s")


# -- (b) byte-level fuzz of the infer endpoint ----------------------------------------------------


def _valid_bodies(rng: np.random.Generator) -> list[tuple[bytes, dict[str, str]]]:
    """Valid fraud requests: JSON (flat, nested, with outputs and parameters) and binary."""
    bodies = []
    for rows in (1, 2, 5):
        x = rng.standard_normal((rows, 30)).astype(np.float32)
        flat = {"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32", "data": x.ravel().tolist()}]}
        bodies.append((json.dumps(flat).encode(), {}))
        nested = {"id": f"r{rows}", "parameters": {"timeout": 5_000_000},
                  "inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32", "data": x.tolist()}],
                  "outputs": [{"name": "probability", "parameters": {"binary_data": rows == 2}}]}
        bodies.append((json.dumps(nested).encode(), {}))
        header = json.dumps({"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        bodies.append((header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                              "Content-Type": "application/octet-stream"}))
    return bodies


_HUGE = [b"1e999999", b"-1e400", b"123456789012345678901234567890123456789", b"18446744073709551616",
         b"-9223372036854775809", b"1" * 5000, b"0." + b"0" * 4000 + b"1", b"NaN", b"Infinity", b"-0", b"1e-400",
         b"4294967296", b"true", b"null", b'"\\ud800"', b'"\\u0000"', b"[]", b"{}"]
_ENCODINGS = ["gzip", "deflate", "br", "identity", "GZIP", "x-garbage", "gzip, deflate", ""]


def _mutate(rng: random.Random, bodies: list[tuple[bytes, dict]]) -> tuple[bytes, dict[str, str]]:
    body, headers = rng.choice(bodies)
    headers = dict(headers)
    body = bytearray(body)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(10)
        if kind == 0 and body:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(body))
                body[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            body = body[: rng.randrange(len(body) + 1)]
        elif kind == 2:  # a splice of two bodies
            other = rng.choice(bodies)[0]
            body = body[: rng.randrange(len(body) + 1)] + other[rng.randrange(len(other) + 1):]
        elif kind == 3:  # a huge or odd number (or token) in place of a number
            digits = [i for i in range(len(body)) if 48 <= body[i] <= 57]
            if digits:
                i = rng.choice(digits)
                body[i:i + 1] = rng.choice(_HUGE)
        elif kind == 4:  # deep nesting around the data or anywhere
            depth = rng.choice((20, 33, 200, 1025, 5000, 100_000))
            at = body.find(b'"data": ') + 8 if b'"data": ' in body and rng.random() < 0.7 else rng.randrange(len(body) + 1)
            body = body[:at] + b"[" * depth + body[at:] + (b"]" * depth if rng.random() < 0.5 else b"")
        elif kind == 5:  # a wrong header length
            headers["Inference-Header-Content-Length"] = rng.choice(
                [str(rng.randrange(-5, len(body) + 50)), "0", str(len(body)), str(2**64), "-1", "abc", " 12", "1e3"])
        elif kind == 6:  # a Content-Encoding, whether or not the body is encoded so
            encoding = rng.choice(_ENCODINGS)
            if encoding.lower() == "gzip" and rng.random() < 0.6:
                body = bytearray(gzip.compress(bytes(body)))
            elif encoding == "deflate" and rng.random() < 0.6:
                body = bytearray(zlib.compress(bytes(body)))
            headers["Content-Encoding"] = encoding
        elif kind == 7:  # random bytes inserted
            at = rng.randrange(len(body) + 1)
            body[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        elif kind == 8:  # a span deleted
            if body:
                a = rng.randrange(len(body))
                del body[a:a + rng.randint(1, 64)]
        else:  # a shape or datatype changed
            text = bytes(body)
            swaps = [(b'"FP32"', rng.choice([b'"FP64"', b'"BYTES"', b'"INT8"', b'"BOOL"', b'"FP16"', b'""', b"7"])),
                     (b'"shape": [', rng.choice([b'"shape": [0, ', b'"shape": [4294967296, ', b'"shape": [-1, ',
                                                 b'"shape": [1e3, ', b'"shape": [[1], ', b'"shape": [99999999999, '])),
                     (b'"binary_data_size": ', rng.choice([b'"binary_data_size": -', b'"binary_data_size": 9',
                                                           b'"binary_data_size": "1"', b'"binary_data_size": 1.5, "x": ']))]
            old, new = rng.choice(swaps)
            body = bytearray(text.replace(old, new, 1))
    return bytes(body), headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _fuzz(host: str, port: int, cases: list[tuple[bytes, dict]], connections: int) -> dict:
    tally = {"answered": 0, "by_status": {}, "server_closed": 0, "dropped": [], "errors_5xx": [], "bad_shape": []}

    async def one_connection(mine: list[tuple[bytes, dict]]) -> None:
        reader = writer = None
        for body, headers in mine:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            head = ["POST /v2/models/fraud/infer HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            try:
                await writer.drain()
                status, out_headers, payload = await asyncio.wait_for(_read_response(reader), 30)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
                tally["dropped"].append(f"{type(exc).__name__} after {body[:80]!r} {headers}")
                writer.close()
                writer = None
                continue
            tally["answered"] += 1
            tally["by_status"][status] = tally["by_status"].get(status, 0) + 1
            if status >= 500:
                tally["errors_5xx"].append(f"{status} {payload[:200]!r} for {body[:200]!r} {headers}")
            elif status >= 400:
                try:
                    doc = json.loads(payload)
                    assert set(doc) == {"error"} and isinstance(doc["error"], str)
                except (ValueError, AssertionError):
                    tally["bad_shape"].append(f"{status} {payload[:200]!r}")
            if out_headers.get("connection", "").lower() == "close":  # the server closes after its answer
                tally["server_closed"] += 1
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_connection(cases[i::connections]) for i in range(connections)))
    return tally


def _outputs(base_url: str, body: bytes, headers: dict) -> np.ndarray:
    """The probabilities a valid request gets, from a JSON or a binary answer."""
    r = httpx.post(f"{base_url}/v2/models/fraud/infer", content=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    length = r.headers.get("inference-header-content-length")
    if length is None:
        return np.asarray(r.json()["outputs"][0]["data"], np.float32)
    return np.frombuffer(r.content[int(length):], "<f4")


def test_byte_level_fuzz_of_infer_gets_no_5xx_and_leaves_the_cluster_healthy(base_url):
    bodies = _valid_bodies(np.random.default_rng(SEED))
    reference = [_outputs(base_url, body, headers) for body, headers in bodies]
    rng = random.Random(SEED)
    cases = [_mutate(rng, bodies) for _ in range(10_000)]
    url = urlsplit(base_url)
    start = time.monotonic()
    tally = asyncio.run(_fuzz(url.hostname, url.port, cases, connections=4))
    elapsed = time.monotonic() - start
    print(f"byte fuzz: {len(cases)} cases in {elapsed:.1f} s, statuses {sorted(tally['by_status'].items())}, "
          f"{tally['server_closed']} closed by the server after an answer")
    assert tally["errors_5xx"] == [], tally["errors_5xx"][:5]
    assert tally["dropped"] == [], tally["dropped"][:5]
    assert tally["bad_shape"] == [], tally["bad_shape"][:5]
    assert tally["answered"] == len(cases)
    assert sum(n for s, n in tally["by_status"].items() if 400 <= s < 500) > len(cases) // 2  # mostly refused ...
    assert tally["by_status"].get(200, 0) > 0  # ... and some mutations were still valid requests
    # Afterwards: ready, and the valid requests get the same answers as before.
    assert httpx.get(f"{base_url}/v2/health/ready", timeout=10).status_code == 200
    for (body, headers), before in zip(bodies, reference):
        np.testing.assert_allclose(_outputs(base_url, body, headers), before, rtol=1e-5, atol=1e-7)
