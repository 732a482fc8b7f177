"""SyncService handlers: decode -> call the domain -> encode, with errors mapped by one table."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from cloud.ingest import Ingestor
from cloud.metrics import Metrics
from cloud.store import Store
from shared.errors import (
    AuthenticationError,
    CdcaError,
    IncompatibleUpdateError,
    PermissionDeniedError,
    ShuttingDownError,
    status_name_for,
)
from shared.pb.v1 import sync_pb2_grpc
from shared.types import EnrollmentGrant
from shared.wire import convert

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def token_digest(token: str) -> str:
    """sha256 hex of a bearer token: the only form tokens are stored in."""
    return hashlib.sha256(token.encode()).hexdigest()


def _abort(context: grpc.ServicerContext, error: BaseException) -> None:
    code = status_name_for(error)
    if code == "INTERNAL":
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    context.abort(getattr(grpc.StatusCode, code), str(error))


def mapped(handler: F) -> F:
    """Run a handler, turning domain errors into their gRPC status (table in shared.errors)."""

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as e:  # the edge: every error leaves as a status, never a crash
            metrics: Metrics | None = getattr(self, "metrics", None)
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                if metrics is not None:
                    code = context.code()
                    metrics.rpc_errors.labels(handler.__name__, getattr(code, "name", "?")).inc()
                raise
            if not isinstance(e, CdcaError):
                log.exception("unexpected error in %s", handler.__name__)
            if metrics is not None:
                metrics.rpc_errors.labels(handler.__name__, status_name_for(e)).inc()
            _abort(context, e)

    return wrapper  # type: ignore[return-value]


def _peer_common_name(context: grpc.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


@dataclass(frozen=True, slots=True)
class Identity:
    """What the servicer needs to enroll devices and bind them to their credentials."""

    enrollment_secret: str
    public_key: bytes
    base_model_hash: str
    bind_client_cert: bool = False
    """Require a client certificate whose common name equals the device id (mutual TLS)."""


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    """cdca.v1.SyncService on top of the store, the ingestor and the published updates."""

    def __init__(self, store: Store, ingestor: Ingestor, identity: Identity, metrics: Metrics,
                 max_payload_bytes: int, upload_timeout_s: float) -> None:
        self._store = store
        self._ingestor = ingestor
        self._identity = identity
        self.metrics = metrics
        self._max_payload_bytes = max_payload_bytes
        self._upload_timeout_s = upload_timeout_s
        self.draining = False

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDownError("server is shutting down")

    def _bind_certificate(self, context: grpc.ServicerContext, device_id: str) -> None:
        if not self._identity.bind_client_cert:
            return
        name = _peer_common_name(context)
        if name != device_id:
            raise PermissionDeniedError(
                f"client certificate is for {name!r}, not for device {device_id!r}")

    def _caller(self, context: grpc.ServicerContext) -> str:
        """Authenticated device id: the bearer token names the device, metadata must agree."""
        self._check_open()
        md = dict(context.invocation_metadata())
        device_id = md.get("x-cdca-device-id", "")
        auth = md.get("authorization", "")
        if not device_id or not auth.startswith("Bearer "):
            raise AuthenticationError("missing x-cdca-device-id or authorization: Bearer <token>")
        owner = self._store.identify(token_digest(auth.removeprefix("Bearer ")))
        if owner is None:
            raise AuthenticationError(f"unknown token (device {device_id[:64]!r})")
        if owner != device_id:
            raise PermissionDeniedError(f"this token may not act as device {device_id[:64]!r}")
        self._bind_certificate(context, device_id)
        return device_id

    @mapped
    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Enroll a device with the fleet secret; issue its token (stored hashed only)."""
        self._check_open()
        enrollment = convert.enrollment_from_pb(request)
        secret = self._identity.enrollment_secret.encode()
        if not hmac.compare_digest(enrollment.enrollment_secret.encode(), secret):
            raise AuthenticationError("enrollment secret is wrong")
        self._bind_certificate(context, enrollment.device_id)
        ours = self._identity.base_model_hash
        if enrollment.base_model_hash and ours and enrollment.base_model_hash != ours:
            raise IncompatibleUpdateError(
                f"base_model_hash: got {enrollment.base_model_hash[:16]}..., the cloud's student"
                f" is {ours[:16]}...")
        token = secrets.token_urlsafe(32)
        version = self._store.enroll(enrollment.device_id, token_digest(token),
                                     enrollment.description, enrollment.base_model_hash)
        self.metrics.device_version.labels(enrollment.device_id).set(version)
        log.info("device enrolled", extra={"device_id": enrollment.device_id})
        grant = EnrollmentGrant(token, self._identity.public_key, version, ours)
        return convert.grant_to_pb(grant)

    @mapped
    def UploadSamples(self, request_iterator: Iterable[Any],  # noqa: N802
                      context: grpc.ServicerContext) -> Any:
        """Reassemble, validate and durably store one upload; the receipt follows the commit."""
        device_id = self._caller(context)
        chunks = self._bounded(request_iterator, context)
        upload_id, payload = convert.reassemble_upload(chunks, self._max_payload_bytes)
        return convert.receipt_to_pb(self._ingestor.accept(device_id, upload_id, payload))

    def _bounded(self, chunks: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """The request stream, cut off once it has run longer than `upload_timeout_s`."""
        deadline = time.monotonic() + self._upload_timeout_s
        for chunk in chunks:
            if time.monotonic() > deadline:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"upload took longer than {self._upload_timeout_s} s")
            yield chunk

    @mapped
    def GetUpdate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Stream the update on top of the caller's version; an empty stream if up to date."""
        device_id = self._caller(context)
        found = self._store.update_for(device_id, convert.have_version_from_pb(request))
        if found is None:
            return iter(())
        return convert.update_chunks(*found)

    @mapped
    def AckUpdate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Record applied / rolled back / rejected for one of the caller's updates."""
        device_id = self._caller(context)
        ack = convert.ack_from_pb(request)
        version = self._store.record_ack(device_id, ack)
        self.metrics.device_version.labels(device_id).set(version)
        log.info("update acknowledged", extra={
            "device_id": device_id, "version": ack.version, "outcome": ack.outcome,
            "probe_accuracy": ack.probe_accuracy})
        return convert.ack_response_to_pb(version)

    @mapped
    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """The calling device's versions and queue depths."""
        device_id = self._caller(context)
        return convert.status_to_pb(self._store.status(device_id))
