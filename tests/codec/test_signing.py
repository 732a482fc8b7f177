"""Ed25519 update-header signing: canonical bytes, key files, tamper detection."""

from __future__ import annotations

import dataclasses
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from shared import signing
from shared.errors import ConfigError, IntegrityError, WireFormatError
from shared.types import UpdateHeader

PAYLOAD = b"some encoded update payload"


def _header(**over) -> UpdateHeader:
    fields = dict(base_version=3, version=4, codec="dwc", base_model_hash="ab12" * 16,
                  payload_sha256=signing.payload_digest(PAYLOAD), payload_bytes=len(PAYLOAD),
                  device_id="cam-7")
    fields.update(over)
    return UpdateHeader(**fields)


def test_sign_and_verify_round_trip_and_every_field_is_covered() -> None:
    key = signing.generate_private_key()
    pub = signing.public_key_bytes(key)
    header = _header()
    signed = dataclasses.replace(header, signature=signing.sign_header(key, header))
    signing.verify_header(pub, signed)
    signing.verify_payload(signed, PAYLOAD)
    changes = dict(base_version=2, version=5, codec="dense-fp16", base_model_hash="ab13" * 16,
                   payload_sha256=bytes(32), payload_bytes=1, device_id="cam-8")
    for name, value in changes.items():
        with pytest.raises(IntegrityError):
            signing.verify_header(pub, dataclasses.replace(signed, **{name: value}))


def test_canonical_bytes_are_deterministic_and_unambiguous() -> None:
    assert signing.header_bytes(_header()) == signing.header_bytes(_header())
    # length prefixes keep field boundaries: moving a character between strings changes the bytes
    a = signing.header_bytes(_header(codec="dwc", device_id="xcam"))
    b = signing.header_bytes(_header(codec="dwcx", device_id="cam"))
    assert a != b
    assert signing.header_bytes(_header()).startswith(signing.HEADER_TAG)
    # the signature field is not covered
    assert signing.header_bytes(_header(signature=b"x" * 64)) == signing.header_bytes(_header())


def test_wrong_key_and_malformed_signatures() -> None:
    key, other = signing.generate_private_key(), signing.generate_private_key()
    header = _header()
    sig = signing.sign_header(key, header)
    with pytest.raises(IntegrityError):
        signing.verify(signing.public_key_bytes(other), signing.header_bytes(header), sig)
    with pytest.raises(IntegrityError, match="64"):
        signing.verify(signing.public_key_bytes(key), signing.header_bytes(header), sig[:10])
    with pytest.raises(IntegrityError, match="32"):
        signing.verify(b"short", signing.header_bytes(header), sig)


def test_payload_tampering_is_detected() -> None:
    header = _header()
    with pytest.raises(IntegrityError, match="sha256"):
        signing.verify_payload(header, PAYLOAD[:-1] + b"!")
    with pytest.raises(IntegrityError, match="bytes"):
        signing.verify_payload(header, PAYLOAD + b"!")


@pytest.mark.parametrize(("field", "value"), [
    ("version", -1), ("version", 2**64), ("payload_bytes", True), ("payload_sha256", b"x" * 31),
    ("base_model_hash", "not-hex"), ("codec", "c" * 2000), ("device_id", "\ud800"),
])
def test_bad_header_fields_raise_wire_format_error(field, value) -> None:
    with pytest.raises(WireFormatError, match=field):
        signing.header_bytes(_header(**{field: value}))


def test_key_file_round_trip(tmp_path) -> None:
    key = signing.generate_private_key()
    path = tmp_path / "signing_key.pem"
    signing.save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = signing.load_private_key(path)
    assert signing.public_key_bytes(loaded) == signing.public_key_bytes(key)
    raw = tmp_path / "raw.key"
    raw.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()))
    assert signing.public_key_bytes(signing.load_private_key(raw)) == signing.public_key_bytes(key)
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="bad.pem"):
        signing.load_private_key(bad)
