"""The device's enrollment credentials on disk (token + cloud public key), written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

FILENAME = "enrollment.json"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What `device-agent register` obtained."""

    device_id: str
    device_token: str
    cloud_public_key: bytes
    base_model_hash: str

    def save(self, data_dir: Path) -> Path:
        """Write to data_dir/enrollment.json (mode 0600, fsynced, atomic rename)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / FILENAME
        tmp = path.with_suffix(".tmp")
        body = json.dumps({
            "device_id": self.device_id,
            "device_token": self.device_token,
            "cloud_public_key": self.cloud_public_key.hex(),
            "base_model_hash": self.base_model_hash,
        })
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, data_dir: Path) -> Credentials:
        """Read credentials; a clear ConfigError when the device was never registered."""
        path = data_dir / FILENAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} missing: run `device-agent register` first") from None
        return cls(
            raw["device_id"], raw["device_token"], bytes.fromhex(raw["cloud_public_key"]),
            raw["base_model_hash"],
        )
