"""Settings of the cloud-server process (env prefix CDCA_CLOUD_, optional TOML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import CdcaSettings


class TlsSettings(BaseModel):
    """Server TLS material; `client_ca_file` turns on mutual TLS."""

    model_config = ConfigDict(extra="forbid")
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    bind_client_cert: bool = True
    """With mutual TLS, a client certificate's common name must equal the device id it acts as."""


class LimitSettings(BaseModel):
    """What one upload, one device and one connection may cost."""

    model_config = ConfigDict(extra="forbid")
    max_payload_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Size of one serialized SampleBatch."""
    max_samples: int = Field(default=256, ge=1)
    """Samples per upload."""
    max_tokens: int = Field(default=16384, ge=1)
    """Visual tokens K per sample."""
    max_dim: int = Field(default=8192, ge=1)
    """Token width D."""
    max_text_chars: int = Field(default=4096, ge=1)
    """Question and answer length."""
    max_frames: int = Field(default=64, ge=1)
    """Raw frames per sample."""
    max_frame_side: int = Field(default=1024, ge=1)
    """Raw frame height and width."""
    max_pending_samples: int = Field(default=10_000, ge=1)
    """Per-device quota of samples waiting for distillation (RESOURCE_EXHAUSTED beyond)."""
    max_pending_bytes: int = Field(default=1 << 30, ge=1)
    """Per-device quota of blob bytes waiting for distillation."""
    upload_timeout_s: float = Field(default=300.0, gt=0)
    """Server-side bound on one upload stream (DEADLINE_EXCEEDED beyond)."""
    max_concurrent_rpcs: int = Field(default=64, ge=1)
    """Further calls are refused with RESOURCE_EXHAUSTED."""


class WorkerSettings(BaseModel):
    """The distillation worker: when rounds run, what trains, how updates are encoded."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    trainer: str = "akd"
    """Registry key in cloud.trainers.TRAINERS: "akd" (the zoo teacher distilled into the zoo
    student's LoRA adapters) or "tiny-kd" (a small MLP pair, for tests without a zoo)."""
    trainer_options: dict[str, Any] = {}
    codec: str = "dwc"
    """Registry key in shared.codec.CODECS."""
    codec_options: dict[str, Any] = {}
    cohort: Literal["device", "fleet"] = "device"
    """One adapter lineage per device, or one shared by the whole fleet."""
    threshold_samples: int = Field(default=32, ge=1)
    """Unclaimed samples of a cohort that start a round at once."""
    schedule_s: float | None = Field(default=300.0, gt=0)
    """Also start a round this often for any cohort with `min_samples`; None disables."""
    min_samples: int = Field(default=1, ge=1)
    max_samples_per_job: int = Field(default=1024, ge=1)
    quiet_s: float = Field(default=0.0, ge=0)
    """A due round waits until the cohort's newest unclaimed sample is this many seconds old,
    so a burst of uploads becomes one round and one update (unless `max_samples_per_job` are
    waiting); 0: start as soon as due."""
    max_attempts: int = Field(default=3, ge=1)
    """Starts of a job (crashes included) before it is marked failed."""


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
    limits: LimitSettings = LimitSettings()
    worker: WorkerSettings = WorkerSettings()
    log_level: str = "INFO"
    log_json: bool = False
