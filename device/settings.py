"""Settings of the device-agent process (env prefix CDCA_DEVICE_, optional TOML file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import CdcaSettings


class ClientTlsSettings(BaseModel):
    """TLS towards the cloud: the CA that signed its certificate, optionally a client cert."""

    model_config = ConfigDict(extra="forbid")
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """Override of the name checked against the server certificate."""


class DeviceSettings(CdcaSettings):
    """Everything the device-agent process needs, built once in main()."""

    model_config = SettingsConfigDict(
        env_prefix="CDCA_DEVICE_", env_nested_delimiter="__", extra="forbid"
    )

    device_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Stable id of this device in the fleet."""
    data_dir: Path
    """Outbox, adapters and enrollment credentials live here."""
    cloud_address: str = "127.0.0.1:50051"
    enrollment_secret: SecretStr | None = None
    """Needed only by `device-agent register`."""
    insecure: bool = False
    """Talk to the cloud without TLS. Must be set explicitly when `tls` is absent."""
    tls: ClientTlsSettings | None = None
    rpc_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of every RPC."""
    log_level: str = "INFO"
    log_json: bool = False
