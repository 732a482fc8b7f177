"""The cloud store's contract: devices, uploaded samples, distillation jobs and signed updates.

`SqliteStore` (SQLite in WAL mode plus blob files) is the embedded default; another backend only
has to honour this Protocol and its durability promise: a method that returns has committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shared.types import (
    DeviceStatus,
    SampleBatch,
    UpdateAck,
    UpdateHeader,
    UploadReceipt,
    UploadSample,
)

StateDict = dict[str, torch.Tensor]

JOB_STATES = ("pending", "running", "done", "failed")
UPDATE_STATES = ("produced", "applied", "rolled_back", "rejected", "abandoned")


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-device limits checked inside the same transaction that stores an upload."""

    max_pending_samples: int = 10_000
    """Samples a device may have waiting for distillation."""
    max_pending_bytes: int = 1 << 30
    """Blob bytes of those waiting samples."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A device's unclaimed samples."""

    samples: int
    newest_at: float
    """Wall-clock time (time.time()) at which the newest of them was stored."""


@dataclass(frozen=True, slots=True)
class Job:
    """A distillation round over the samples it claimed; its state survives restarts."""

    job_id: str
    cohort: str
    """"device:<id>" for a per-device round, "fleet" for one adapter shared by all devices."""
    device_ids: tuple[str, ...]
    state: str  # one of JOB_STATES
    attempts: int
    step: int
    """Last checkpointed step (0 = no checkpoint)."""


@dataclass(frozen=True, slots=True)
class Head:
    """What a device's next update is encoded against (DWC error feedback)."""

    version: int
    """The newest version still in force for the device (produced or applied; 0 = shipped)."""
    target: StateDict
    """The cloud's adapter at that version (what the distiller produced, before compression)."""
    residual: StateDict | None
    """What the device still lacks of `target` after decoding (None = nothing, e.g. version 0)."""


@dataclass(frozen=True, slots=True)
class NewUpdate:
    """One device's share of a finished round, ready to publish (version assigned by the store)."""

    device_id: str
    base_version: int
    codec: str
    base_model_hash: str
    payload: bytes
    target: StateDict
    residual: StateDict
    metrics: Mapping[str, float] = field(default_factory=dict)


Signer = Callable[[UpdateHeader], bytes]


class Store(Protocol):
    """Durable cloud state. Every method is thread-safe and atomic; returning means committed."""

    def close(self) -> None:
        """Release the database and files."""
        ...

    # -- devices --------------------------------------------------------------------------
    def enroll(self, device_id: str, token_sha256: str, description: str,
               base_model_hash: str) -> int:
        """Create or re-key a device; returns the adapter version the cloud records for it."""
        ...

    def identify(self, token_sha256: str) -> str | None:
        """The device a token (by its hash) belongs to, or None."""
        ...

    def status(self, device_id: str) -> DeviceStatus:
        """Versions and queue depths of one device."""
        ...

    def adapter_versions(self) -> dict[str, int]:
        """Acknowledged adapter version of every device."""
        ...

    # -- ingestion ------------------------------------------------------------------------
    def find_upload(self, device_id: str, upload_id: str) -> tuple[bytes, UploadReceipt] | None:
        """(payload sha256, duplicate receipt) of a stored upload, or None."""
        ...

    def put_upload(self, device_id: str, upload_id: str, payload_sha256: bytes,
                   batch: SampleBatch, quota: Quota) -> UploadReceipt:
        """Store the batch's new samples (blobs first, then one transaction) and return the
        receipt; a concurrent or earlier upload with the same id yields its duplicate receipt.

        Raises:
            StoreFullError: the device's quota would be exceeded; nothing was stored.
            WireFormatError: the upload id was already used for a different payload.
        """
        ...

    def pending_by_device(self) -> dict[str, Pending]:
        """Unclaimed samples per device (devices without any are absent)."""
        ...

    # -- jobs -----------------------------------------------------------------------------
    def create_job(self, cohort: str, device_ids: tuple[str, ...], max_samples: int) -> Job | None:
        """Claim up to `max_samples` unclaimed samples of `device_ids` for a new job (None if
        there are none)."""
        ...

    def open_jobs(self) -> list[Job]:
        """Jobs not finished yet (pending or interrupted while running), oldest first."""
        ...

    def start_job(self, job_id: str) -> Job:
        """Mark a job running and count the attempt."""
        ...

    def job_samples(self, job_id: str) -> list[UploadSample]:
        """The samples a job claimed, in upload order."""
        ...

    def save_checkpoint(self, job_id: str, step: int, tensors: StateDict) -> None:
        """Durably replace the job's checkpoint."""
        ...

    def load_checkpoint(self, job_id: str) -> tuple[int, StateDict] | None:
        """(step, tensors) of the job's checkpoint, or None."""
        ...

    def fail_job(self, job_id: str, reason: str) -> None:
        """Give up on a job; its samples stay with it and are no longer pending."""
        ...

    def withhold_job(self, job_id: str, reason: str) -> None:
        """Finish a job without publishing anything; its samples stay with it (consumed)."""
        ...

    # -- updates --------------------------------------------------------------------------
    def initial_adapter(self) -> StateDict | None:
        """The shipped adapter (version 0), once recorded."""
        ...

    def set_initial_adapter(self, adapter: StateDict) -> None:
        """Record the shipped adapter (first start only; later calls must pass the same)."""
        ...

    def cohort_adapter(self, cohort: str) -> StateDict | None:
        """The adapter the cohort's latest finished round produced, or None."""
        ...

    def head(self, device_id: str) -> Head:
        """What the device's next update is encoded against."""
        ...

    def publish(self, job_id: str, updates: list[NewUpdate], sign: Signer) -> list[UpdateHeader]:
        """In one transaction: assign versions, sign and store every update, finish the job."""
        ...

    def update_for(self, device_id: str, have_version: int) -> tuple[UpdateHeader, bytes] | None:
        """The newest update on top of `have_version` for the device, or None when up to date.

        Raises:
            NotFoundError: no such version exists.
            PermissionDeniedError: the version belongs to another device.
        """
        ...

    def record_ack(self, device_id: str, ack: UpdateAck) -> int:
        """Record an acknowledgement; returns the device's adapter version afterwards.

        Raises:
            NotFoundError / PermissionDeniedError: as for `update_for`.
        """
        ...
