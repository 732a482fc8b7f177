"""Server-side limits on a real in-process server: message size, upload duration, enrollment
bound to the base model, and a new call during a drain."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud.app import CloudApp
from cloud.settings import CloudSettings
from shared.pb.v1 import sync_pb2 as pb
from shared.wire import convert
from tests.cloud.client import Device, batch, code_of, tokens_sample

pytestmark = pytest.mark.integration


@pytest.fixture
def app(tmp_path: Path) -> Iterator[CloudApp]:
    settings = CloudSettings(
        data_dir=tmp_path, enrollment_secret="fleet-secret", listen_address="127.0.0.1:0",
        insecure=True, limits={"upload_timeout_s": 0.5}, worker={"enabled": False, "trainer": "tiny-kd"})
    running = CloudApp(settings)
    yield running
    running.stop(0)


@pytest.fixture
def channel(app: CloudApp) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


def test_a_message_above_one_chunk_is_refused_by_grpc(channel: grpc.Channel) -> None:
    dev = Device(channel, "cam-01").register()
    huge = pb.UploadChunk(upload_id="u1", index=0, count=1, sha256=b"\0" * 32,
                          total_bytes=3 << 20, data=b"\0" * (3 << 20))
    assert code_of(dev.upload_chunks, [huge]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dev.status().stored_samples == 0


def test_an_upload_slower_than_the_server_bound_is_cut_off(channel: grpc.Channel) -> None:
    dev = Device(channel, "cam-01").register()
    payload = convert.encode_sample_batch(batch(*[
        tokens_sample(f"s{i}", k=8192, seed=i) for i in range(3)]))

    def slow() -> Iterator[pb.UploadChunk]:
        for i, chunk in enumerate(convert.upload_chunks("u1", payload)):
            if i:
                time.sleep(1.0)
            yield chunk

    assert code_of(dev.upload_chunks, slow()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dev.status().stored_samples == 0


def test_enrollment_checks_the_base_model(app: CloudApp, channel: grpc.Channel) -> None:
    dev = Device(channel, "cam-01")
    assert code_of(dev.register, base_model_hash="0" * 64) == grpc.StatusCode.FAILED_PRECONDITION
    assert dev.register(base_model_hash=app.trainer.base_model_hash).token


def test_new_calls_during_a_drain_are_unavailable(app: CloudApp, channel: grpc.Channel) -> None:
    dev = Device(channel, "cam-01").register()
    app.server.enter_drain()
    assert code_of(dev.status) == grpc.StatusCode.UNAVAILABLE
    assert code_of(Device(channel, "cam-02").register) == grpc.StatusCode.UNAVAILABLE
