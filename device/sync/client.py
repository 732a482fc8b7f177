"""GrpcTransport: the device's gRPC client for cdca.v1.SyncService (deadlines on every call)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from device.settings import DeviceSettings
from device.sync.credentials import Credentials
from device.sync.transport import MalformedUpdateError
from shared.errors import TransportError, WireFormatError
from shared.pb.v1 import sync_pb2_grpc
from shared.types import (
    DeviceStatus,
    Enrollment,
    EnrollmentGrant,
    UpdateAck,
    UpdateHeader,
    UploadReceipt,
)
from shared.wire import convert


def open_channel(settings: DeviceSettings) -> grpc.Channel:
    """A channel to the cloud: TLS (optionally mutual) unless `insecure` is set."""
    if settings.tls is None:
        return grpc.insecure_channel(settings.cloud_address)
    tls = settings.tls
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(),
        private_key=tls.key_file.read_bytes() if tls.key_file else None,
        certificate_chain=tls.cert_file.read_bytes() if tls.cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(settings.cloud_address, creds, options=options)


class GrpcTransport:
    """Calls the cloud; every failure surfaces as TransportError(code, details)."""

    def __init__(
        self, channel: grpc.Channel, timeout_s: float, credentials: Credentials | None = None
    ) -> None:
        self._channel = channel
        self._stub = sync_pb2_grpc.SyncServiceStub(channel)
        self._timeout_s = timeout_s
        self.credentials = credentials

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self.credentials is None:
            raise TransportError("UNAUTHENTICATED", "device is not registered")
        return (
            ("x-cdca-device-id", self.credentials.device_id),
            ("authorization", f"Bearer {self.credentials.device_token}"),
        )

    def register(self, enrollment: Enrollment) -> EnrollmentGrant:
        """Enroll with the fleet secret."""
        try:
            reply = self._stub.Register(
                convert.enrollment_to_pb(enrollment), timeout=self._timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from e
        return convert.grant_from_pb(reply)

    def status(self) -> DeviceStatus:
        """The cloud's view of this device."""
        try:
            reply = self._stub.GetStatus(
                convert.status_request(), timeout=self._timeout_s, metadata=self._metadata()
            )
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from e
        return convert.status_from_pb(reply)

    def upload(self, upload_id: str, payload: bytes) -> UploadReceipt:
        """Stream one serialized SampleBatch in chunks; returns once the cloud stored it."""
        try:
            reply = self._stub.UploadSamples(
                convert.upload_chunks(upload_id, payload), timeout=self._timeout_s,
                metadata=self._metadata(), wait_for_ready=True,
            )
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from e
        receipt = convert.receipt_from_pb(reply)
        if receipt.upload_id != upload_id:
            raise TransportError("DATA_LOSS", f"receipt is for {receipt.upload_id!r}, "
                                              f"expected {upload_id!r}")
        return receipt

    def fetch_update(self, have_version: int, max_bytes: int) -> tuple[UpdateHeader, bytes] | None:
        """The update based on `have_version` (header unverified), or None when up to date."""
        first: list[Any] = []

        def tap(chunks: Iterable[Any]) -> Iterator[Any]:
            for c in chunks:
                if not first:
                    first.append(c)
                yield c

        try:
            stream = self._stub.GetUpdate(
                convert.get_update_request(have_version), timeout=self._timeout_s,
                metadata=self._metadata(),
            )
            return convert.reassemble_update(tap(stream), max_bytes)
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from e
        except WireFormatError as e:
            header = convert.update_header_of(first[0]) if first else None
            raise MalformedUpdateError(header, str(e)) from e

    def ack(self, ack: UpdateAck) -> int:
        """Report what happened to an update; returns the version the cloud now records."""
        try:
            reply = self._stub.AckUpdate(
                convert.ack_to_pb(ack), timeout=self._timeout_s, metadata=self._metadata()
            )
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from e
        return convert.ack_response_from_pb(reply)
