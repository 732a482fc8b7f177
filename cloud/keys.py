"""The cloud's Ed25519 update-signing key, created on first start under the data directory."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import signing

public_key_bytes = signing.public_key_bytes


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at `path`, or create it (mode 0600, written atomically)."""
    if path.exists():
        return signing.load_private_key(path)
    key = signing.generate_private_key()
    signing.save_private_key(key, path)
    return key
