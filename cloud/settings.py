"""Settings of the cloud-server process (env prefix CDCA_CLOUD_, optional TOML file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import CdcaSettings


class TlsSettings(BaseModel):
    """Server TLS material; `client_ca_file` turns on mutual TLS."""

    model_config = ConfigDict(extra="forbid")
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class CloudSettings(CdcaSettings):
    """Everything the cloud-server process needs, built once in main()."""

    model_config = SettingsConfigDict(
        env_prefix="CDCA_CLOUD_", env_nested_delimiter="__", extra="forbid"
    )

    data_dir: Path
    """Directory of the store (SQLite + blobs), the signing key and worker checkpoints."""
    enrollment_secret: SecretStr
    """Shared secret a device presents once at Register to obtain its own token."""
    listen_address: str = "127.0.0.1:50051"
    """host:port of the gRPC server; port 0 picks a free port (see --port-file)."""
    insecure: bool = False
    """Serve without TLS. Must be set explicitly when `tls` is absent."""
    tls: TlsSettings | None = None
    grace_s: float = Field(default=10.0, ge=0)
    """On SIGTERM, in-flight calls get this long to finish."""
    max_workers: int = Field(default=16, ge=1, le=1024)
    """gRPC handler threads."""
    metrics_address: str | None = None
    """host:port for Prometheus metrics; None disables."""
    log_level: str = "INFO"
    log_json: bool = False
