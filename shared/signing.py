"""Ed25519 signatures over canonical bytes of update headers (cloud signs, device verifies).

Canonical header bytes (big-endian integers, strings as u32 length + UTF-8):

    b"CDCA-UPDATE-HEADER-v1\\0"  domain separation tag
    u64 base_version | u64 version | str codec | str base_model_hash
    32 bytes payload_sha256 | u64 payload_bytes | str device_id

Both sides call `header_bytes` on the same `shared.types.UpdateHeader`, so they sign and verify
exactly the same bytes; the `signature` field itself is not covered.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ConfigError, IntegrityError, WireFormatError
from shared.types import UpdateHeader

HEADER_TAG = b"CDCA-UPDATE-HEADER-v1\x00"
_U64_MAX = 2**64 - 1
_MAX_STR_BYTES = 1024
_HEX = frozenset("0123456789abcdefABCDEF")


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (protect the file by permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as PEM with mode 0600, atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM (PKCS#8) or raw 32-byte Ed25519 private key file."""
    data = path.read_bytes()
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"signing key {path}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: got {type(key).__name__}, expected Ed25519")
    return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what the cloud hands devices at enrollment)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def payload_digest(payload: bytes) -> bytes:
    """SHA-256 of an update payload (the header's `payload_sha256`)."""
    return hashlib.sha256(payload).digest()


def header_bytes(header: UpdateHeader) -> bytes:
    """Canonical bytes of every header field but `signature`; WireFormatError on a bad field."""
    for field in ("base_version", "version", "payload_bytes"):
        value = getattr(header, field)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
            raise WireFormatError(
                f"header.{field}: got {value!r}, expected an integer in 0..2**64-1"
            )
    digest = header.payload_sha256
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise WireFormatError(
            f"header.payload_sha256: got {len(digest) if isinstance(digest, bytes) else digest!r}"
            " bytes, expected 32"
        )
    if not isinstance(header.base_model_hash, str) or not set(header.base_model_hash) <= _HEX:
        raise WireFormatError(
            f"header.base_model_hash: got {str(header.base_model_hash)[:80]!r}, expected hex digits"
        )
    parts = [
        HEADER_TAG,
        struct.pack(">QQ", header.base_version, header.version),
        _string("codec", header.codec),
        _string("base_model_hash", header.base_model_hash),
        digest,
        struct.pack(">Q", header.payload_bytes),
        _string("device_id", header.device_id),
    ]
    return b"".join(parts)


def sign_header(key: Ed25519PrivateKey, header: UpdateHeader) -> bytes:
    """64-byte Ed25519 signature of `header_bytes(header)`."""
    return key.sign(header_bytes(header))


def verify(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise IntegrityError unless `signature` is `public_key`'s signature of `data`."""
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise IntegrityError(f"public key: got {len(public_key)} bytes, expected 32 raw Ed25519")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise IntegrityError(f"signature: got {len(signature)} bytes, expected 64")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except InvalidSignature:
        raise IntegrityError("signature: does not verify under the cloud's public key") from None


def verify_header(public_key: bytes, header: UpdateHeader) -> None:
    """Check `header.signature` over `header_bytes(header)`; IntegrityError if it fails."""
    verify(public_key, header_bytes(header), header.signature)


def verify_payload(header: UpdateHeader, payload: bytes) -> None:
    """Check a received payload against the (already verified) header's size and digest."""
    if len(payload) != header.payload_bytes:
        raise IntegrityError(
            f"payload: got {len(payload)} bytes, header says {header.payload_bytes}"
        )
    if payload_digest(payload) != header.payload_sha256:
        raise IntegrityError("payload: sha256 does not match the signed header")


def _string(field: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise WireFormatError(f"header.{field}: got {type(value).__name__}, expected str")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise WireFormatError(f"header.{field}: not encodable as UTF-8") from None
    if len(raw) > _MAX_STR_BYTES:
        raise WireFormatError(f"header.{field}: {len(raw)} bytes, expected <= {_MAX_STR_BYTES}")
    return struct.pack(">I", len(raw)) + raw
