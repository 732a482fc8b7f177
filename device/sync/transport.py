"""What the agent needs from its link to the cloud (GrpcTransport implements it)."""

from __future__ import annotations

from typing import Protocol

from shared.errors import WireFormatError
from shared.types import UpdateAck, UpdateHeader, UploadReceipt

RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                             "ABORTED", "INTERNAL", "UNKNOWN", "CANCELLED"})
"""gRPC status names after which the same request may succeed later; anything else (e.g.
INVALID_ARGUMENT, UNAUTHENTICATED) is permanent for that request."""


class Transport(Protocol):
    """Uploads, update downloads and acknowledgements; the only I/O-doing protocol."""

    def upload(self, upload_id: str, payload: bytes) -> UploadReceipt:
        """Send one serialized SampleBatch under an idempotency id."""
        ...

    def fetch_update(self, have_version: int, max_bytes: int) -> tuple[UpdateHeader, bytes] | None:
        """The (unverified) update that applies on `have_version`, or None."""
        ...

    def ack(self, ack: UpdateAck) -> int:
        """Report an update's outcome."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class MalformedUpdateError(WireFormatError):
    """An update stream failed reassembly (size or sha256); `header` is what its first chunk
    announced (unverified), or None when no header arrived."""

    def __init__(self, header: UpdateHeader | None, reason: str) -> None:
        super().__init__(reason)
        self.header = header
