"""Domain error types shared by both processes, and their one mapping to gRPC status codes."""

from __future__ import annotations


class CdcaError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CdcaError, ValueError):
    """Invalid settings or algorithm configuration (names the field, the value, the expectation)."""


class WireFormatError(CdcaError, ValueError):
    """A received message is malformed: wrong dtype, shape, size, encoding or checksum."""


class AuthenticationError(CdcaError):
    """Missing, unknown, expired or revoked credentials."""


class PermissionDeniedError(CdcaError):
    """Valid credentials, but the caller may not touch this resource."""


class NotFoundError(CdcaError, LookupError):
    """A referenced object (device, update version) does not exist."""


class IncompatibleUpdateError(CdcaError):
    """An update cannot apply here: wrong base version, base model hash or codec."""


class IntegrityError(CdcaError):
    """A signature or hash does not verify."""


class StoreFullError(CdcaError):
    """A disk or quota budget would be exceeded; nothing was written."""


class ShuttingDownError(CdcaError):
    """The process is draining and accepts no new work."""


class TransportError(CdcaError):
    """A remote call failed; `code` is the gRPC status code name (e.g. "UNAVAILABLE")."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


# The one table from domain errors to gRPC status code names (servicer edge). Order matters:
# the first matching class wins, so subclasses go before their bases.
STATUS_BY_ERROR: tuple[tuple[type[CdcaError], str], ...] = (
    (ConfigError, "INVALID_ARGUMENT"),
    (WireFormatError, "INVALID_ARGUMENT"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (PermissionDeniedError, "PERMISSION_DENIED"),
    (NotFoundError, "NOT_FOUND"),
    (IncompatibleUpdateError, "FAILED_PRECONDITION"),
    (IntegrityError, "DATA_LOSS"),
    (StoreFullError, "RESOURCE_EXHAUSTED"),
    (ShuttingDownError, "UNAVAILABLE"),
)


def status_name_for(error: BaseException) -> str:
    """gRPC status code name for a domain error; INTERNAL for anything unexpected."""
    for cls, name in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return name
    return "INTERNAL"
