"""Blob files of the embedded store: written atomically, tensors as safetensors (never pickle)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from shared.errors import StoreFullError
from shared.types import UploadSample, VisualTokens

TMP_SUFFIX = ".tmp"


def new_name(suffix: str) -> str:
    """A fresh blob file name: never derived from client input, so no path tricks."""
    return f"{uuid.uuid4().hex}{suffix}"


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No space, quota exhausted, or the file size limit (RLIMIT_FSIZE) reached."""


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the directory: a reader sees all of `data` or nothing.

    Raises:
        StoreFullError: the disk (or quota, or file size limit) is full; nothing was left behind.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a partial temp file would hold the space until restart
        if e.errno in DISK_FULL:
            raise StoreFullError(
                f"store disk full writing {len(data)} bytes under {path.parent.name}/: "
                f"{os.strerror(e.errno)}") from e
        raise
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (detached, contiguous, CPU copies)."""
    return safetensors.torch.save(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    )


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `state_to_bytes`."""
    return dict(safetensors.torch.load(data))


def samples_to_bytes(samples: list[UploadSample]) -> bytes:
    """The tensors of a list of samples as one safetensors file (keys "<i>.<name>")."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(samples):
        if s.tokens is not None:
            arrays[f"{i}.values"] = np.ascontiguousarray(s.tokens.values)
            arrays[f"{i}.positions"] = np.ascontiguousarray(s.tokens.positions)
            if s.tokens.scales is not None:
                arrays[f"{i}.scales"] = np.ascontiguousarray(s.tokens.scales)
        if s.frames is not None:
            arrays[f"{i}.frames"] = np.ascontiguousarray(s.frames)
    return safetensors.numpy.save(arrays) if arrays else b""


def sample_row(sample: UploadSample) -> str:
    """The non-tensor fields of a sample as JSON (stored in SQLite next to the blob index)."""
    tokens = sample.tokens
    return json.dumps({
        "media_kind": sample.media_kind,
        "question": sample.question,
        "device_answer": sample.device_answer,
        "confidence": sample.confidence,
        "meta": sample.meta,
        "grid": list(tokens.grid) if tokens else None,
        "feature_space": tokens.feature_space if tokens else None,
    })


def sample_from(sample_id: str, row: str, arrays: dict[str, np.ndarray], i: int) -> UploadSample:
    """Rebuild one stored sample from its JSON row and its upload's blob arrays."""
    fields = json.loads(row)
    tokens = None
    if fields["grid"] is not None:
        tokens = VisualTokens(
            values=arrays[f"{i}.values"],
            positions=arrays[f"{i}.positions"],
            grid=tuple(fields["grid"]),
            feature_space=fields["feature_space"],
            scales=arrays.get(f"{i}.scales"),
        )
    return UploadSample(
        sample_id=sample_id,
        media_kind=fields["media_kind"],
        question=fields["question"],
        device_answer=fields["device_answer"],
        confidence=fields["confidence"],
        tokens=tokens,
        frames=arrays.get(f"{i}.frames"),
        meta=fields["meta"],
    )


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an upload blob (empty file -> no arrays)."""
    data = path.read_bytes()
    return dict(safetensors.numpy.load(data)) if data else {}


def sha256(data: bytes) -> bytes:
    """SHA-256 digest (an update header's `payload_sha256`)."""
    return hashlib.sha256(data).digest()
