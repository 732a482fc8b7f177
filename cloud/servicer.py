"""SyncService handlers: decode -> call the domain -> encode, with errors mapped by one table."""

from __future__ import annotations

import functools
import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from cloud.store import Store
from shared.errors import AuthenticationError, CdcaError, ShuttingDownError, status_name_for
from shared.pb.v1 import sync_pb2_grpc
from shared.types import DeviceStatus, EnrollmentGrant
from shared.wire import convert

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, error: BaseException) -> None:
    code = status_name_for(error)
    if code == "INTERNAL":
        log.exception("unexpected error in handler")
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    context.abort(getattr(grpc.StatusCode, code), str(error))


def mapped(handler: F) -> F:
    """Run a handler, turning domain errors into their gRPC status (table in shared.errors)."""

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as e:  # the edge: every error leaves as a status, never a crash
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            if not isinstance(e, CdcaError):
                log.exception("unexpected error in %s", handler.__name__)
            _abort(context, e)

    return wrapper  # type: ignore[return-value]


def caller(context: grpc.ServicerContext, store: Store) -> str:
    """Authenticated device id from the call metadata (`x-cdca-device-id`, bearer token)."""
    md = dict(context.invocation_metadata())
    device_id = md.get("x-cdca-device-id", "")
    auth = md.get("authorization", "")
    if not device_id or not auth.startswith("Bearer "):
        raise AuthenticationError("missing x-cdca-device-id or authorization: Bearer <token>")
    store.authenticate(device_id, auth.removeprefix("Bearer "))
    return device_id


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    """cdca.v1.SyncService on top of the store."""

    def __init__(
        self, store: Store, enrollment_secret: str, public_key: bytes, base_model_hash: str
    ) -> None:
        self._store = store
        self._secret = enrollment_secret
        self._public_key = public_key
        self._base_model_hash = base_model_hash
        self.draining = False

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDownError("server is shutting down")

    @mapped
    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Enroll a device with the fleet secret; issue its token."""
        self._check_open()
        enrollment = convert.enrollment_from_pb(request)
        if not hmac.compare_digest(enrollment.enrollment_secret.encode(), self._secret.encode()):
            raise AuthenticationError("enrollment secret is wrong")
        token = secrets.token_urlsafe(32)
        version = self._store.enroll(
            enrollment.device_id, token, enrollment.description, enrollment.base_model_hash
        )
        log.info("device enrolled", extra={"device_id": enrollment.device_id})
        grant = EnrollmentGrant(token, self._public_key, version, self._base_model_hash)
        return convert.grant_to_pb(grant)

    @mapped
    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """The calling device's versions and queue depths."""
        device_id = caller(context, self._store)
        version = self._store.adapter_version(device_id)
        return convert.status_to_pb(DeviceStatus(device_id, version, version, 0, 0, 0))
