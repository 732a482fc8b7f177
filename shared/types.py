"""Domain records that cross the wire (no protobuf types here; see shared/wire/convert.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A device asking to join the fleet."""

    device_id: str
    enrollment_secret: str
    description: str = ""
    base_model_hash: str = ""


@dataclass(frozen=True, slots=True)
class EnrollmentGrant:
    """What the cloud gives an enrolled device."""

    device_token: str
    cloud_public_key: bytes
    adapter_version: int
    base_model_hash: str


@dataclass(frozen=True, slots=True)
class VisualTokens:
    """Kept encoder tokens of one sample (UTS token level)."""

    values: np.ndarray  # (K, D) float16, or int8 with `scales`
    positions: np.ndarray  # (K,) int64, ascending global indices into `grid`
    grid: tuple[int, ...]  # (frames, rows, cols) of the full token grid
    feature_space: str
    scales: np.ndarray | None = None  # (K,) float32 when values are int8

    def dequantized(self) -> np.ndarray:
        """(K, D) float32 values."""
        if self.scales is None:
            return self.values.astype(np.float32)
        return self.values.astype(np.float32) * self.scales[:, None]


@dataclass(frozen=True, slots=True)
class UploadSample:
    """One sample the device was unsure about."""

    sample_id: str
    media_kind: str
    question: str
    device_answer: str
    confidence: float
    tokens: VisualTokens | None = None
    frames: np.ndarray | None = None  # (F, H, W, 3) uint8
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SampleBatch:
    """The unit of upload."""

    adapter_version: int
    samples: tuple[UploadSample, ...]


@dataclass(frozen=True, slots=True)
class UploadReceipt:
    """The cloud's promise that an upload is durably stored."""

    upload_id: str
    stored_samples: int
    duplicate: bool
    pending_samples: int


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    """Signed metadata of an encoded adapter update."""

    base_version: int
    version: int
    codec: str
    base_model_hash: str
    payload_sha256: bytes
    payload_bytes: int
    device_id: str
    signature: bytes = b""


OUTCOMES = ("applied", "rolled_back", "rejected")


@dataclass(frozen=True, slots=True)
class UpdateAck:
    """What the device did with an update."""

    version: int
    outcome: str  # one of OUTCOMES
    probe_accuracy: float = float("nan")
    previous_probe_accuracy: float = float("nan")
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The cloud's view of one device."""

    device_id: str
    adapter_version: int
    latest_version: int
    pending_samples: int
    stored_samples: int
    rounds: int
