"""The real cloud-server on loopback: every malformed or unauthorised upload gets a precise status
and stores nothing; duplicate upload ids store once; updates are private to their device."""

from __future__ import annotations

import hashlib
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shared import signing
from shared.pb.v1 import sync_pb2 as pb
from shared.wire import convert
from tests.cloud.client import Device, batch, code_of, tokens_sample
from tests.cloud.daemon import blob_count, rows, start_cloud
from tests.support import CloudProcess

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudProcess, Path]]:
    workdir = tmp_path_factory.mktemp("cloud")
    server = start_cloud(workdir, metrics_address="127.0.0.1:0",
                         limits={"max_pending_samples": 5, "max_samples": 8})
    yield server, workdir
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def channel(cloud: tuple[CloudProcess, Path]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cloud[0].address) as ch:
        yield ch


def _mutated(mutate: Callable[[pb.SampleBatch], None]) -> bytes:
    msg = pb.SampleBatch()
    msg.ParseFromString(convert.encode_sample_batch(batch(tokens_sample("s1"))))
    mutate(msg)
    return msg.SerializeToString()


def _set(path: str, value: object) -> Callable[[pb.SampleBatch], None]:
    def mutate(msg: pb.SampleBatch) -> None:
        *parents, leaf = path.split(".")
        target = msg.samples[0]
        for p in parents:
            target = getattr(target, p)
        field = getattr(target, leaf)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(target, leaf, value)
    return mutate


def _bad_utf8() -> bytes:
    payload = convert.encode_sample_batch(batch(tokens_sample("s1")))
    assert payload.count(b"what is shown?") == 1
    return payload.replace(b"what is shown?", b"what is \xff\xfe\xfd\xfc\xfb?")  # same length


NAN = np.full((8, 32), np.nan, dtype=np.float16).tobytes()
MALFORMED = {
    "wrong dtype": (_mutated(_set("tokens.values.dtype", "float64")), "dtype"),
    "float32 values": (_mutated(_set("tokens.values.dtype", "float32")), "dtype"),
    "huge shape": (_mutated(_set("tokens.values.shape", [2**40, 2**40])), "more than"),
    "shape/data mismatch": (_mutated(_set("tokens.values.shape", [9, 32])), "bytes"),
    "NaN values": (_mutated(_set("tokens.values.data", NAN)), "NaN"),
    "bad UTF-8": (_bad_utf8(), "UTF-8"),
    "not protobuf": (b"\xff\xff\xff\xff", "payload"),
    "confidence > 1": (_mutated(_set("confidence", 2.0)), "confidence"),
    "positions unsorted": (
        _mutated(_set("tokens.positions.data", np.arange(8)[::-1].astype("<i8").tobytes())),
        "ascending"),
    "unknown feature space": (_mutated(_set("tokens.feature_space", "llava/other")),
                              "feature_space"),
    "width the teacher cannot read": (
        convert.encode_sample_batch(batch(tokens_sample("s1", d=16))), "(K, 32)"),
    "too many samples": (
        convert.encode_sample_batch(batch(*[tokens_sample(f"s{i}") for i in range(9)])),
        "samples"),
}


def _nothing_stored(workdir: Path, before: tuple[int, int]) -> None:
    assert (blob_count(workdir), rows(workdir, "SELECT COUNT(*) FROM samples")[0][0]) == before


def _counts(workdir: Path) -> tuple[int, int]:
    return blob_count(workdir), rows(workdir, "SELECT COUNT(*) FROM samples")[0][0]


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_upload_is_invalid_argument_and_stores_nothing(
        cloud: tuple[CloudProcess, Path], channel: grpc.Channel, case: str) -> None:
    payload, fragment = MALFORMED[case]
    dev = Device(channel, "bad-1").register()
    before = _counts(cloud[1])
    with pytest.raises(grpc.RpcError) as e:
        dev.upload_payload(f"u-{hashlib.sha1(case.encode()).hexdigest()[:8]}", payload)
    assert e.value.code() == INVALID, e.value.details()
    assert fragment in (e.value.details() or ""), e.value.details()
    _nothing_stored(cloud[1], before)
    assert dev.status().stored_samples == 0


def test_broken_chunk_streams_are_invalid_argument(
        cloud: tuple[CloudProcess, Path], channel: grpc.Channel) -> None:
    dev = Device(channel, "bad-2").register()
    payload = convert.encode_sample_batch(batch(tokens_sample("s1")))
    before = _counts(cloud[1])
    wrong_hash = pb.UploadChunk(upload_id="u1", index=0, count=1, sha256=b"\0" * 32,
                                total_bytes=len(payload), data=payload)
    assert code_of(dev.upload_chunks, [wrong_hash]) == INVALID
    too_big = pb.UploadChunk(upload_id="u1", index=0, count=100, total_bytes=2**40,
                             sha256=hashlib.sha256(payload).digest(), data=payload)
    assert code_of(dev.upload_chunks, [too_big]) == INVALID
    assert code_of(dev.upload_chunks, []) == INVALID
    _nothing_stored(cloud[1], before)


def test_unknown_device_bad_token_and_borrowed_token(
        cloud: tuple[CloudProcess, Path], channel: grpc.Channel) -> None:
    a, b = Device(channel, "auth-a").register(), Device(channel, "auth-b").register()
    good = batch(tokens_sample("s1"))
    before = _counts(cloud[1])
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert code_of(a.upload, "u1", good, device_id="ghost", token="made-up") == unauth
    assert code_of(a.upload, "u1", good, token="not-the-token") == unauth
    assert code_of(a.upload, "u1", good, token="") == unauth
    assert code_of(a.upload, "u1", good, device_id="auth-b") == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(Device(channel, "auth-c").register, secret="guess") == unauth
    _nothing_stored(cloud[1], before)
    assert a.status().stored_samples == 0 and b.status().stored_samples == 0


def test_same_upload_id_twice_stores_once(cloud: tuple[CloudProcess, Path],
                                          channel: grpc.Channel) -> None:
    dev = Device(channel, "dup-1").register()
    b = batch(tokens_sample("s1", seed=1), tokens_sample("s2", seed=2))
    first = dev.upload("up-1", b)
    blobs = blob_count(cloud[1])
    again = dev.upload("up-1", b)
    assert (first.stored_samples, first.duplicate) == (2, False)
    assert (again.stored_samples, again.duplicate, again.pending_samples) == (2, True, 2)
    assert blob_count(cloud[1]) == blobs and dev.status().stored_samples == 2
    changed = batch(tokens_sample("s1", seed=1), tokens_sample("s3", seed=3))
    assert code_of(dev.upload, "up-1", changed) == INVALID


def test_quota_is_resource_exhausted(cloud: tuple[CloudProcess, Path],
                                     channel: grpc.Channel) -> None:
    dev = Device(channel, "quota-1").register()
    dev.upload("q1", batch(*[tokens_sample(f"s{i}") for i in range(3)]))
    before = _counts(cloud[1])
    too_many = batch(*[tokens_sample(f"t{i}") for i in range(3)])
    assert code_of(dev.upload, "q2", too_many) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _nothing_stored(cloud[1], before)


def _wait_for_update(dev: Device, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = dev.status().latest_version
        if latest:
            return latest
        time.sleep(0.1)
    raise TimeoutError("no update was produced")


def test_updates_are_signed_and_private_to_their_device(
        cloud: tuple[CloudProcess, Path], channel: grpc.Channel) -> None:
    a, b = Device(channel, "upd-a").register(), Device(channel, "upd-b").register()
    receipt = a.upload("ua", batch(*[tokens_sample(f"s{i}", seed=i) for i in range(4)]))
    assert receipt.stored_samples == 4
    version = _wait_for_update(a)
    found = a.get_update(0)
    assert found is not None
    header, payload = found
    assert (header.version, header.base_version, header.device_id) == (version, 0, "upd-a")
    signing.verify_header(a.public_key, header)
    signing.verify_payload(header, payload)
    assert a.get_update(version) is None  # up to date once holding it
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(b.get_update, version) == denied
    assert code_of(b.ack, version) == denied
    assert code_of(b.get_update, 0, device_id="upd-a") == denied
    assert code_of(b.ack, version, device_id="upd-a") == denied
    assert code_of(a.ack, version + 1000) == grpc.StatusCode.NOT_FOUND
    assert a.ack(version) == version
    status = a.status()
    assert (status.adapter_version, status.rounds, status.pending_samples) == (version, 1, 0)
    assert b.status().adapter_version == 0


def test_metrics_endpoint_reports_uploads_rounds_and_versions(
        cloud: tuple[CloudProcess, Path], channel: grpc.Channel) -> None:
    port = int((cloud[1] / "cloud.metrics-port").read_text())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("cdca_uploads_total", "cdca_upload_bytes_total", "cdca_pending_samples",
                 "cdca_distill_rounds_total", "cdca_distill_loss", "cdca_update_bytes_bucket",
                 "cdca_device_adapter_version", "cdca_rpc_errors_total"):
        assert name in text, name

