"""Split payloads into <= 1 MiB chunks and reassemble them with order, size and hash checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from shared.errors import WireFormatError

CHUNK_BYTES = 1024 * 1024  # gRPC's default receive limit is 4 MiB; stay well below it.


def split(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int, bytes]]:
    """Yield (index, count, data) covering `payload`; an empty payload is one empty chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"`chunk_bytes` must be positive, got {chunk_bytes}")
    count = max(1, -(-len(payload) // chunk_bytes))
    view = memoryview(payload)
    for i in range(count):
        yield i, count, bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


class Reassembler:
    """Collects chunks of one payload; rejects gaps, reordering, oversize and hash mismatch."""

    def __init__(self, max_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._max_bytes = max_bytes
        self._chunk_bytes = chunk_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._count: int | None = None
        self._total: int | None = None
        self._sha256: bytes | None = None

    def add(
        self, index: int, count: int, data: bytes, total_bytes: int = 0, sha256: bytes = b""
    ) -> None:
        """Add the next chunk; header fields (total, sha) are taken from chunk 0."""
        expected = len(self._parts)
        if index != expected:
            raise WireFormatError(f"chunk.index: got {index}, expected {expected} (in order)")
        if index == 0:
            if count < 1:
                raise WireFormatError(f"chunk.count: got {count}, expected >= 1")
            if total_bytes > self._max_bytes:
                raise WireFormatError(
                    f"chunk.total_bytes: got {total_bytes}, limit is {self._max_bytes}"
                )
            if len(sha256) != 32:
                raise WireFormatError(f"chunk.sha256: got {len(sha256)} bytes, expected 32")
            if count != max(1, -(-total_bytes // self._chunk_bytes)):
                raise WireFormatError(
                    f"chunk.count: got {count}, expected ceil({total_bytes}/{self._chunk_bytes})"
                )
            self._count, self._total, self._sha256 = count, total_bytes, sha256
        elif count != self._count:
            raise WireFormatError(f"chunk.count: changed from {self._count} to {count}")
        if index >= (self._count or 0):
            raise WireFormatError(f"chunk.index: {index} beyond count {self._count}")
        if len(data) > self._chunk_bytes:
            raise WireFormatError(f"chunk.data: {len(data)} bytes, limit {self._chunk_bytes}")
        self._size += len(data)
        if self._total is not None and self._size > self._total:
            raise WireFormatError(f"chunks carry more than total_bytes={self._total}")
        self._parts.append(data)

    def finish(self) -> bytes:
        """Return the payload once complete and verified."""
        if self._count is None:
            raise WireFormatError("upload carried no chunks")
        if len(self._parts) != self._count:
            raise WireFormatError(f"got {len(self._parts)} of {self._count} chunks")
        if self._size != self._total:
            raise WireFormatError(f"got {self._size} bytes, total_bytes said {self._total}")
        payload = b"".join(self._parts)
        if hashlib.sha256(payload).digest() != self._sha256:
            raise WireFormatError("sha256 of the reassembled payload does not match chunk.sha256")
        return payload
