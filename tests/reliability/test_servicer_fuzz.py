"""Hostile clients against the real servicer: the whole cloud app in-process on 127.0.0.1:0.

Upload streams built from a valid batch and then truncated, reordered, duplicated, dropped or
rewritten field by field, plus random request fields and credentials on every other RPC. Every
call must end in a receipt/reply or one of the status codes the servicer documents for it
(shared.errors table); never INTERNAL or UNKNOWN, no handler exception logged, and the server
still healthy and accepting a valid upload afterwards.

Default example counts keep this to seconds in CI; `CDCA_FUZZ_SERVICER_EXAMPLES=N` runs N per test.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud.app import CloudApp
from cloud.settings import CloudSettings
from shared.pb.v1 import sync_pb2 as pb
from shared.types import SampleBatch, UploadSample, VisualTokens
from shared.wire import convert
from tests.cloud.client import Device, batch, tokens_sample

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CDCA_FUZZ_SERVICER_EXAMPLES", "100"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
U32, U64 = 2**32 - 1, 2**64 - 1
TIMEOUT_S = 10.0  # far above any honest reply here: running into it means a handler hung

SC = grpc.StatusCode
AUTH = {SC.UNAUTHENTICATED, SC.PERMISSION_DENIED}
DOCUMENTED = {
    "UploadSamples": AUTH | {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED},
    "Register": {SC.UNAUTHENTICATED, SC.PERMISSION_DENIED, SC.INVALID_ARGUMENT,
                 SC.FAILED_PRECONDITION},
    "GetUpdate": AUTH | {SC.NOT_FOUND, SC.INVALID_ARGUMENT},
    "AckUpdate": AUTH | {SC.NOT_FOUND, SC.INVALID_ARGUMENT},
    "GetStatus": AUTH | {SC.NOT_FOUND},
}
SEEN: dict[str, dict[str, int]] = {}


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudApp, Device, _Errors]]:
    errors = _Errors()
    logging.getLogger("cloud").addHandler(errors)
    values: dict[str, Any] = {
        "data_dir": tmp_path_factory.mktemp("cloud"), "enrollment_secret": "fleet-secret",
        "listen_address": "127.0.0.1:0", "insecure": True,
        "worker": {"enabled": False, "trainer": "tiny-kd"}}
    app = CloudApp(CloudSettings(**values))
    channel = grpc.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield app, Device(channel, "cam-fuzz").register(), errors
    finally:
        channel.close()
        app.stop(0)
        logging.getLogger("cloud").removeHandler(errors)


def _payload(n: int, seed: int) -> bytes:
    samples = [tokens_sample(f"f{seed}-{i}", k=8, d=32, seed=seed + i) for i in range(n)]
    return convert.encode_sample_batch(batch(*samples))


def _outcome(rpc: str, call: object) -> None:
    """Run `call`; a status must be one documented for `rpc`."""
    try:
        call()  # type: ignore[operator]
        code = "OK"
    except grpc.RpcError as e:
        assert e.code() in DOCUMENTED[rpc], (rpc, e.code(), e.details())
        code = e.code().name
    SEEN.setdefault(rpc, {})
    SEEN[rpc][code] = SEEN[rpc].get(code, 0) + 1


CHUNK_EDITS = st.lists(st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 7)),
    st.tuples(st.just("dup"), st.integers(0, 7)),
    st.tuples(st.just("swap"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 7), st.integers(0, 4096)),
    st.tuples(st.just("flip"), st.integers(0, 7), st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("index"), st.integers(0, 7), st.integers(0, U32)),
    st.tuples(st.just("count"), st.integers(0, 7), st.integers(0, U32)),
    st.tuples(st.just("total"), st.integers(0, 7), st.integers(0, U64)),
    st.tuples(st.just("sha"), st.integers(0, 7), st.binary(max_size=40)),
    st.tuples(st.just("id"), st.integers(0, 7), st.text(max_size=140)),
), max_size=4)


def _edit(chunks: list[pb.UploadChunk], edit: tuple) -> None:
    if not chunks:
        return
    op, j, *args = edit
    j %= len(chunks)
    c = chunks[j]
    if op == "drop":
        chunks.pop(j)
    elif op == "dup":
        chunks.insert(j, pb.UploadChunk.FromString(c.SerializeToString()))
    elif op == "swap":
        k = args[0] % len(chunks)
        chunks[j], chunks[k] = chunks[k], chunks[j]
    elif op == "truncate":
        c.data = c.data[:args[0]]
    elif op == "flip" and c.data:
        data = bytearray(c.data)
        data[args[0] % len(data)] ^= args[1]
        c.data = bytes(data)
    elif op == "index":
        c.index = args[0]
    elif op == "count":
        c.count = args[0]
    elif op == "total":
        c.total_bytes = args[0]
    elif op == "sha":
        c.sha256 = args[0]
    elif op == "id":
        c.upload_id = args[0]


@FUZZ
@given(n=st.integers(1, 3), parts=st.integers(1, 6), seed=st.integers(0, 10**6),
       upload_id=st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True), edits=CHUNK_EDITS)
def test_mangled_upload_streams(cloud: tuple[CloudApp, Device, _Errors], n: int, parts: int,
                                seed: int, upload_id: str, edits: list[tuple]) -> None:
    _, dev, _ = cloud
    payload = _payload(n, seed)
    digest = hashlib.sha256(payload).digest()
    cuts = np.linspace(0, len(payload), parts + 1).astype(int)
    chunks = [pb.UploadChunk(upload_id=upload_id, index=i, count=parts,
                             sha256=digest if i == 0 else b"",
                             total_bytes=len(payload) if i == 0 else 0,
                             data=payload[cuts[i]:cuts[i + 1]]) for i in range(parts)]
    for e in edits:
        _edit(chunks, e)

    def call() -> None:
        reply = dev.stub.UploadSamples(iter(chunks), timeout=TIMEOUT_S, metadata=dev.metadata())
        receipt = convert.receipt_from_pb(reply)
        assert receipt.upload_id == chunks[0].upload_id and receipt.stored_samples <= n

    _outcome("UploadSamples", call)


TEXT = st.text(max_size=100)
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80)
VERSION = st.one_of(st.integers(0, 8), st.integers(2**63 - 2, 2**63 + 1), st.integers(0, U64))
"""uint64 on the wire, int64 in SQLite: 2**63 gave INTERNAL until the store checked the range."""


def _edge(rpc: str) -> dict[str, object]:
    return {"rpc": rpc, "who": "self", "device_id": "", "token": "", "version": 2**63,
            "outcome": 1, "accuracy": 0.5, "text": "", "secret": ""}


@FUZZ
@example(**_edge("GetUpdate"))
@example(**_edge("AckUpdate"))
@given(rpc=st.sampled_from(["Register", "GetUpdate", "AckUpdate", "GetStatus"]),
       who=st.sampled_from(["self", "random", "missing", "other-device"]),
       device_id=ASCII, token=ASCII, version=VERSION,
       outcome=st.integers(-5, 10), accuracy=st.floats(width=32),
       text=TEXT, secret=st.sampled_from(["fleet-secret", "wrong", ""]))
def test_random_request_fields(cloud: tuple[CloudApp, Device, _Errors], rpc: str, who: str,
                               device_id: str, token: str, version: int, outcome: int,
                               accuracy: float, text: str, secret: str) -> None:
    _, dev, _ = cloud
    md = {"self": dev.metadata(), "random": dev.metadata(device_id, token),
          "missing": (), "other-device": dev.metadata("cam-other")}[who]
    stub = dev.stub
    if rpc == "Register":
        # never re-key the fixture's own device: the other cases still need its token
        name = device_id if device_id != dev.device_id else device_id + "x"
        request = pb.RegisterRequest(device_id=name, enrollment_secret=secret,
                                     description=text, base_model_hash=text[:64])
        _outcome(rpc, lambda: stub.Register(request, timeout=TIMEOUT_S))
    elif rpc == "GetUpdate":
        _outcome(rpc, lambda: list(stub.GetUpdate(pb.GetUpdateRequest(have_version=version),
                                                  timeout=TIMEOUT_S, metadata=md)))
    elif rpc == "AckUpdate":
        request = pb.AckUpdateRequest(version=version, probe_accuracy=accuracy,
                                      previous_probe_accuracy=accuracy, detail=text)
        request.outcome = outcome  # type: ignore[assignment]  # open enum: any int32
        _outcome(rpc, lambda: stub.AckUpdate(request, timeout=TIMEOUT_S, metadata=md))
    else:
        _outcome(rpc, lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S,
                                             metadata=md))


def test_server_is_healthy_after_the_fuzz(cloud: tuple[CloudApp, Device, _Errors]) -> None:
    app, dev, errors = cloud
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="cdca.v1.SyncService"), timeout=TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    tokens = VisualTokens(np.ones((2, 32), np.float16), np.arange(2), (1, 1, 2), "tiny/features")
    ok = SampleBatch(0, (UploadSample("after", "image", "q?", "a", 0.1, tokens),))
    assert dev.upload("after-fuzz", ok).stored_samples == 1
    assert not errors.records, [r.getMessage() for r in errors.records]
    logging.getLogger(__name__).info("servicer fuzz outcomes %s", SEEN)
    assert sum(sum(v.values()) for v in SEEN.values()) >= 2 * EXAMPLES
    assert SEEN["UploadSamples"].get("OK", 0) > 0  # some streams survived their edits intact
