"""Settings of the device-agent process (env prefix CDCA_DEVICE_, optional TOML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


COMPRESSOR_DEFAULTS: dict[str, dict[str, Any]] = {"vidcom2": {"keep_ratio": 0.5}}
"""Device defaults where they differ from a compressor's own: VidCom2 keeps half the video
tokens (its paper's default is 0.25); the zoo student answers 0.92 of held-out source videos at
0.5 and 0.81 at 0.25, 0.96 uncompressed (`python -m bench.compression --checkpoint
zoo/default/student --original-positions`)."""


class ModelSettings(BaseModel):
    """The student: checkpoint, base compression, adapter, generation."""

    model_config = ConfigDict(extra="forbid")
    checkpoint_dir: Path
    """HF save_pretrained directory of the student plus its VLMProcessor files."""
    quantization: Literal["fp32", "int8_dynamic", "bnb8", "bnb4"] = "fp32"
    adapter_dir: Path | None = None
    """Shipped peft adapter; default `<checkpoint_dir>/adapter`, else a fresh zero-delta LoRA."""
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_targets: str = (r".*language_model.*\."
                         r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    onnx_vision: Path | None = None
    """ONNX file from `device-agent export-onnx`; when set, the vision tower runs in onnxruntime."""
    max_new_tokens: int = Field(default=4, ge=1, le=64)
    batch_size: int = Field(default=4, ge=1, le=64)
    original_positions: bool = True
    """LLaVA-OV: kept visual tokens keep their full-sequence RoPE positions (see CompressedVLM),
    the layout the zoo trains with (token drop) and the cloud distils in; False: the official
    VidCom2 code's compact renumbering."""
    feature_space: str = "projected"
    """`VisualTokens.feature_space` of token uploads (must be one the cloud accepts)."""


class InputSettings(BaseModel):
    """Where questions come from."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["procedural", "folder"] = "procedural"
    domains: list[str] = ["source"]
    """Procedural: camera domains, interleaved round-robin (a mixed stream when several)."""
    seed: int = 0
    media_kind: Literal["video", "image"] = "video"
    limit: int | None = Field(default=None, ge=1)
    """Stop after this many samples (procedural streams are infinite otherwise)."""
    folder: Path | None = None
    """Folder input: `questions.jsonl` lines {"id", "media", "question"} beside the media files
    (.npy uint8 (F, H, W, 3), images, or videos decoded with PyAV)."""


class UplinkSettings(BaseModel):
    """UTS payload, outbox and retry policy."""

    model_config = ConfigDict(extra="forbid")
    payload: Literal["tokens", "frames"] = "tokens"
    """"tokens": selected encoder tokens; "frames": raw uint8 frames (cloud encoder differs)."""
    calibration_samples: int = Field(default=32, ge=2)
    """Source-domain samples whose confidence quantile becomes the threshold when none is set."""
    calibration_seed: int = 7
    recalibrate: bool = True
    """Recompute the threshold (same quantile) whenever an update is applied: a new adapter
    shifts the confidence scale."""
    outbox_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    full_policy: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    batch_samples: int = Field(default=16, ge=1, le=256)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)
    """At the end of a finite input, wait this long for the outbox to empty."""


class UpdateSettings(BaseModel):
    """Downlink polling and the probe that guards it."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    poll_interval_s: float = Field(default=5.0, gt=0)
    rollback_margin: float = Field(default=0.05, ge=0, le=1)
    probe_samples: int = Field(default=16, ge=1)
    probe_domain: str = "source"
    probe_seed: int = 12345
    probe_folder: Path | None = None
    """Labelled probe set (folder input layout with "answer" per line) instead of the
    procedural `probe_domain` stream."""
    max_update_bytes: int = Field(default=64 * 1024 * 1024, gt=0)


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
    model: ModelSettings | None = None
    """Required by `run`, `export-onnx`."""
    compressor: str = "vidcom2"
    compressor_options: dict[str, Any] | None = None
    """Options of the compressor; None: `COMPRESSOR_DEFAULTS` for it."""
    sampler: str = "uts"
    sampler_options: dict[str, Any] = {}
    input: InputSettings = InputSettings()
    uplink: UplinkSettings = UplinkSettings()
    updates: UpdateSettings = UpdateSettings()
    answers_path: Path | None = None
    """JSONL of answers; default `<data_dir>/answers.jsonl`."""
    progress: bool = True
    """Show a progress bar on stderr."""
    metrics_address: str | None = None
    """host:port for Prometheus gauges of the agent's counters; None disables."""

    def compressor_config(self) -> dict[str, Any]:
        """The compressor's options as set, else the device default for it."""
        if self.compressor_options is not None:
            return dict(self.compressor_options)
        return dict(COMPRESSOR_DEFAULTS.get(self.compressor, {}))
