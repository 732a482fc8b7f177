"""A minimal SyncService client for cloud tests (raw stubs + shared.wire.convert, no device)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import numpy as np

from shared.pb.v1 import sync_pb2 as pb
from shared.pb.v1 import sync_pb2_grpc
from shared.types import (
    DeviceStatus,
    Enrollment,
    SampleBatch,
    UpdateAck,
    UpdateHeader,
    UploadReceipt,
    UploadSample,
    VisualTokens,
)
from shared.wire import convert

TIMEOUT_S = 30.0


def tokens_sample(sample_id: str, k: int = 8, d: int = 32, seed: int = 0,
                  space: str = "tiny/features") -> UploadSample:
    """A valid sample with K kept visual tokens of width D."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((k, d)).astype(np.float16)
    tokens = VisualTokens(values, np.arange(k, dtype=np.int64), (1, -(-k // 64), 64), space)
    return UploadSample(sample_id, "image", "what is shown?", "a cat", 0.4, tokens)


def batch(*samples: UploadSample) -> SampleBatch:
    return SampleBatch(0, tuple(samples))


class Device:
    """One device's view of the cloud over a channel (its token once registered)."""

    def __init__(self, channel: grpc.Channel, device_id: str) -> None:
        self.stub = sync_pb2_grpc.SyncServiceStub(channel)
        self.device_id = device_id
        self.token = ""
        self.public_key = b""

    def metadata(self, device_id: str | None = None,
                 token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("x-cdca-device-id", device_id or self.device_id),
                ("authorization", f"Bearer {self.token if token is None else token}"))

    def register(self, secret: str = "fleet-secret", base_model_hash: str = "") -> Device:
        grant = convert.grant_from_pb(self.stub.Register(
            convert.enrollment_to_pb(Enrollment(self.device_id, secret, "test", base_model_hash)),
            timeout=TIMEOUT_S))
        self.token, self.public_key = grant.device_token, grant.cloud_public_key
        return self

    def upload_payload(self, upload_id: str, payload: bytes, **md: str) -> UploadReceipt:
        chunks = convert.upload_chunks(upload_id, payload)
        reply = self.stub.UploadSamples(chunks, timeout=TIMEOUT_S, metadata=self.metadata(**md))
        return convert.receipt_from_pb(reply)

    def upload(self, upload_id: str, b: SampleBatch, **md: str) -> UploadReceipt:
        return self.upload_payload(upload_id, convert.encode_sample_batch(b), **md)

    def upload_chunks(self, chunks: Iterable[pb.UploadChunk], **md: str) -> UploadReceipt:
        reply = self.stub.UploadSamples(iter(chunks), timeout=TIMEOUT_S,
                                        metadata=self.metadata(**md))
        return convert.receipt_from_pb(reply)

    def get_update(self, have_version: int, **md: str) -> tuple[UpdateHeader, bytes] | None:
        stream: Iterator[pb.UpdateChunk] = self.stub.GetUpdate(
            convert.get_update_request(have_version), timeout=TIMEOUT_S,
            metadata=self.metadata(**md))
        return convert.reassemble_update(stream, 64 * 1024 * 1024)

    def ack(self, version: int, outcome: str = "applied", **md: str) -> int:
        reply = self.stub.AckUpdate(convert.ack_to_pb(UpdateAck(version, outcome, 0.9, 0.8)),
                                    timeout=TIMEOUT_S, metadata=self.metadata(**md))
        return convert.ack_response_from_pb(reply)

    def status(self, **md: str) -> DeviceStatus:
        return convert.status_from_pb(self.stub.GetStatus(
            convert.status_request(), timeout=TIMEOUT_S, metadata=self.metadata(**md)))


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    """The status code a failing call ends with (fails the test if it succeeds)."""
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError("call succeeded, expected an error status")
