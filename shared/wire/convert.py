"""The only module that imports protobuf message types: domain records <-> cdca.v1 messages.

Everything received is validated here (sizes, dtypes, UTF-8, ranges) and turned into the
records of shared/types.py, or rejected with a WireFormatError naming the field.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from shared.errors import WireFormatError
from shared.pb.v1 import sync_pb2 as pb
from shared.types import (
    OUTCOMES,
    DeviceStatus,
    Enrollment,
    EnrollmentGrant,
    SampleBatch,
    UpdateAck,
    UpdateHeader,
    UploadReceipt,
    UploadSample,
    VisualTokens,
)
from shared.wire import chunking
from shared.wire.tensors import WireTensor, decode_array, encode_array

DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UPLOAD_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MEDIA_KINDS = ("video", "image")


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """Bounds a received SampleBatch must respect (the cloud's settings fill these)."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_samples: int = 256
    max_tokens: int = 16384
    max_dim: int = 8192
    max_text_chars: int = 4096
    max_frames: int = 64
    max_frame_side: int = 1024


def check_device_id(device_id: str) -> str:
    """Validate a device id (1-64 chars of [A-Za-z0-9_.-])."""
    if not DEVICE_ID.match(device_id):
        raise WireFormatError(f"device_id: got {device_id!r}, expected 1-64 chars [A-Za-z0-9_.-]")
    return device_id


def _tensor_to_pb(t: WireTensor) -> pb.Tensor:
    return pb.Tensor(dtype=t.dtype, shape=list(t.shape), data=t.data)


def _tensor_from_pb(t: pb.Tensor) -> WireTensor:
    return WireTensor(t.dtype, tuple(t.shape), t.data)


# ---- enrollment ---------------------------------------------------------------------------


def enrollment_to_pb(e: Enrollment) -> pb.RegisterRequest:
    """Domain -> RegisterRequest."""
    return pb.RegisterRequest(
        device_id=e.device_id,
        enrollment_secret=e.enrollment_secret,
        description=e.description,
        base_model_hash=e.base_model_hash,
    )


def enrollment_from_pb(m: pb.RegisterRequest) -> Enrollment:
    """RegisterRequest -> domain, validated."""
    if len(m.description) > 1024:
        raise WireFormatError(f"description: {len(m.description)} chars, limit 1024")
    return Enrollment(
        check_device_id(m.device_id), m.enrollment_secret, m.description, m.base_model_hash
    )


def grant_to_pb(g: EnrollmentGrant) -> pb.RegisterResponse:
    """Domain -> RegisterResponse."""
    return pb.RegisterResponse(
        device_token=g.device_token,
        cloud_public_key=g.cloud_public_key,
        adapter_version=g.adapter_version,
        base_model_hash=g.base_model_hash,
    )


def grant_from_pb(m: pb.RegisterResponse) -> EnrollmentGrant:
    """RegisterResponse -> domain."""
    if len(m.cloud_public_key) != 32:
        raise WireFormatError(
            f"cloud_public_key: {len(m.cloud_public_key)} bytes, expected 32 (Ed25519)"
        )
    return EnrollmentGrant(
        m.device_token, m.cloud_public_key, m.adapter_version, m.base_model_hash
    )


# ---- uploads ------------------------------------------------------------------------------


def encode_sample_batch(batch: SampleBatch) -> bytes:
    """Serialize a SampleBatch to the bytes that get chunked."""
    msg = pb.SampleBatch(adapter_version=batch.adapter_version)
    for s in batch.samples:
        out = msg.samples.add(
            sample_id=s.sample_id,
            media_kind=s.media_kind,
            question=s.question,
            device_answer=s.device_answer,
            confidence=s.confidence,
        )
        out.meta.update(s.meta)
        if s.tokens is not None:
            t = s.tokens
            out.tokens.values.CopyFrom(_tensor_to_pb(encode_array(t.values)))
            out.tokens.positions.CopyFrom(_tensor_to_pb(encode_array(t.positions)))
            out.tokens.grid.extend(t.grid)
            out.tokens.feature_space = t.feature_space
            if t.scales is not None:
                out.tokens.scales.CopyFrom(_tensor_to_pb(encode_array(t.scales)))
        if s.frames is not None:
            out.frames.CopyFrom(_tensor_to_pb(encode_array(s.frames)))
    return msg.SerializeToString(deterministic=True)


def _text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise WireFormatError(f"{field}: {len(value)} chars, limit {limit}")
    return value


def _tokens_from_pb(m: pb.VisualTokens, field: str, lim: UploadLimits) -> VisualTokens:
    values = decode_array(
        _tensor_from_pb(m.values),
        field=f"{field}.values",
        dtypes=("float16", "int8"),
        rank=2,
        max_elements=lim.max_tokens * lim.max_dim,
    )
    k, d = values.shape
    if k == 0 or k > lim.max_tokens or d == 0 or d > lim.max_dim:
        raise WireFormatError(
            f"{field}.values.shape: got {values.shape}, expected (1..{lim.max_tokens}, "
            f"1..{lim.max_dim})"
        )
    scales = None
    if values.dtype == np.int8:
        if not m.HasField("scales"):
            raise WireFormatError(f"{field}.scales: required when values are int8")
        scales = decode_array(
            _tensor_from_pb(m.scales), field=f"{field}.scales", dtypes=("float32",), rank=1,
            max_elements=k,
        )
        if scales.shape != (k,):
            raise WireFormatError(f"{field}.scales.shape: got {scales.shape}, expected ({k},)")
    elif m.HasField("scales"):
        raise WireFormatError(f"{field}.scales: only allowed with int8 values")
    grid = tuple(int(g) for g in m.grid)
    if len(grid) != 3 or any(g <= 0 or g > 4096 for g in grid):
        raise WireFormatError(f"{field}.grid: got {list(grid)}, expected 3 dims in 1..4096")
    positions = decode_array(
        _tensor_from_pb(m.positions), field=f"{field}.positions", dtypes=("int64",), rank=1,
        max_elements=k,
    )
    if positions.shape != (k,):
        raise WireFormatError(f"{field}.positions.shape: got {positions.shape}, expected ({k},)")
    n = math.prod(grid)
    if positions.min() < 0 or positions.max() >= n or (np.diff(positions) <= 0).any():
        raise WireFormatError(
            f"{field}.positions: must be strictly ascending in [0, {n}) for grid {list(grid)}"
        )
    space = _text(m.feature_space, f"{field}.feature_space", 128)
    if not space:
        raise WireFormatError(f"{field}.feature_space: empty")
    return VisualTokens(values, positions, grid, space, scales)


def decode_sample_batch(payload: bytes, limits: UploadLimits) -> SampleBatch:
    """Parse and validate a reassembled SampleBatch payload.

    Raises:
        WireFormatError: malformed protobuf, invalid UTF-8, or any field out of bounds.
    """
    msg = pb.SampleBatch()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError) as e:
        raise WireFormatError(f"payload: not a valid SampleBatch ({e})") from None
    if not 1 <= len(msg.samples) <= limits.max_samples:
        raise WireFormatError(
            f"samples: got {len(msg.samples)}, expected 1..{limits.max_samples}"
        )
    samples = []
    seen: set[str] = set()
    for i, s in enumerate(msg.samples):
        field = f"samples[{i}]"
        if not UPLOAD_ID.match(s.sample_id):
            raise WireFormatError(f"{field}.sample_id: got {s.sample_id!r}, expected 1-128 id chars")
        if s.sample_id in seen:
            raise WireFormatError(f"{field}.sample_id: {s.sample_id!r} repeated in the batch")
        seen.add(s.sample_id)
        if s.media_kind not in MEDIA_KINDS:
            raise WireFormatError(f"{field}.media_kind: got {s.media_kind!r}, expected {MEDIA_KINDS}")
        if not (math.isfinite(s.confidence) and 0.0 <= s.confidence <= 1.0):
            raise WireFormatError(f"{field}.confidence: got {s.confidence}, expected in [0, 1]")
        if not s.HasField("tokens") and not s.HasField("frames"):
            raise WireFormatError(f"{field}: needs `tokens` or `frames`")
        tokens = _tokens_from_pb(s.tokens, f"{field}.tokens", limits) if s.HasField("tokens") else None
        frames = None
        if s.HasField("frames"):
            frames = decode_array(
                _tensor_from_pb(s.frames), field=f"{field}.frames", dtypes=("uint8",), rank=4,
                max_elements=limits.max_frames * limits.max_frame_side**2 * 3,
            )
            f, h, w, c = frames.shape
            if not (1 <= f <= limits.max_frames and c == 3 and 0 < h <= limits.max_frame_side
                    and 0 < w <= limits.max_frame_side):
                raise WireFormatError(f"{field}.frames.shape: got {frames.shape}, expected (F,H,W,3)")
        if len(s.meta) > 16 or any(len(k) > 64 or len(v) > 256 for k, v in s.meta.items()):
            raise WireFormatError(f"{field}.meta: at most 16 entries, keys <= 64, values <= 256 chars")
        samples.append(
            UploadSample(
                sample_id=s.sample_id,
                media_kind=s.media_kind,
                question=_text(s.question, f"{field}.question", limits.max_text_chars),
                device_answer=_text(s.device_answer, f"{field}.device_answer", limits.max_text_chars),
                confidence=float(s.confidence),
                tokens=tokens,
                frames=frames,
                meta=dict(s.meta),
            )
        )
    return SampleBatch(int(msg.adapter_version), tuple(samples))


def upload_chunks(upload_id: str, payload: bytes) -> Iterator[pb.UploadChunk]:
    """The client-streaming request for one upload."""
    digest = hashlib.sha256(payload).digest()
    for index, count, data in chunking.split(payload):
        yield pb.UploadChunk(
            upload_id=upload_id,
            index=index,
            count=count,
            sha256=digest if index == 0 else b"",
            total_bytes=len(payload) if index == 0 else 0,
            data=data,
        )


def reassemble_upload(chunks: Iterable[pb.UploadChunk], max_bytes: int) -> tuple[str, bytes]:
    """Collect an upload stream into (upload_id, verified payload)."""
    assembler = chunking.Reassembler(max_bytes)
    upload_id: str | None = None
    for c in chunks:
        if upload_id is None:
            if not UPLOAD_ID.match(c.upload_id):
                raise WireFormatError(f"upload_id: got {c.upload_id!r}, expected 1-128 id chars")
            upload_id = c.upload_id
        elif c.upload_id != upload_id:
            raise WireFormatError(f"upload_id: changed mid-stream to {c.upload_id!r}")
        assembler.add(c.index, c.count, c.data, c.total_bytes, c.sha256)
    if upload_id is None:
        raise WireFormatError("upload stream was empty")
    return upload_id, assembler.finish()


def receipt_to_pb(r: UploadReceipt) -> pb.UploadReceipt:
    """Domain -> UploadReceipt."""
    return pb.UploadReceipt(
        upload_id=r.upload_id,
        stored_samples=r.stored_samples,
        duplicate=r.duplicate,
        pending_samples=r.pending_samples,
    )


def receipt_from_pb(m: pb.UploadReceipt) -> UploadReceipt:
    """UploadReceipt -> domain."""
    return UploadReceipt(m.upload_id, m.stored_samples, m.duplicate, m.pending_samples)


# ---- updates ------------------------------------------------------------------------------


def get_update_request(have_version: int) -> pb.GetUpdateRequest:
    """Build the GetUpdate request."""
    return pb.GetUpdateRequest(have_version=have_version)


def have_version_from_pb(m: pb.GetUpdateRequest) -> int:
    """GetUpdateRequest -> the version the device holds."""
    return int(m.have_version)


def _header_to_pb(h: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        base_version=h.base_version,
        version=h.version,
        codec=h.codec,
        base_model_hash=h.base_model_hash,
        payload_sha256=h.payload_sha256,
        payload_bytes=h.payload_bytes,
        device_id=h.device_id,
        signature=h.signature,
    )


def _header_from_pb(m: pb.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        int(m.base_version), int(m.version), m.codec, m.base_model_hash,
        bytes(m.payload_sha256), int(m.payload_bytes), m.device_id, bytes(m.signature),
    )


def update_chunks(header: UpdateHeader, payload: bytes) -> Iterator[pb.UpdateChunk]:
    """The server-streaming response for one update."""
    for index, count, data in chunking.split(payload):
        yield pb.UpdateChunk(
            header=_header_to_pb(header) if index == 0 else None,
            index=index,
            count=count,
            data=data,
        )


def reassemble_update(
    chunks: Iterable[pb.UpdateChunk], max_bytes: int
) -> tuple[UpdateHeader, bytes] | None:
    """Collect an update stream; None when the stream was empty (device up to date).

    Only sizes and the sha256 are checked here; the signature is checked by the caller.
    """
    assembler = chunking.Reassembler(max_bytes)
    header: UpdateHeader | None = None
    for c in chunks:
        if header is None:
            if not c.HasField("header"):
                raise WireFormatError("update: first chunk carries no header")
            header = _header_from_pb(c.header)
            if header.payload_bytes > max_bytes:
                raise WireFormatError(
                    f"update.payload_bytes: {header.payload_bytes}, limit {max_bytes}"
                )
            assembler.add(c.index, c.count, c.data, header.payload_bytes, header.payload_sha256)
        else:
            assembler.add(c.index, c.count, c.data)
    if header is None:
        return None
    return header, assembler.finish()


def update_header_of(chunk: pb.UpdateChunk) -> UpdateHeader | None:
    """The (unverified) header a chunk carries, if any: lets a receiver acknowledge the version
    of an update whose stream failed reassembly (bad size or sha256)."""
    return _header_from_pb(chunk.header) if chunk.HasField("header") else None


_OUTCOME_TO_PB = {
    "applied": pb.AckUpdateRequest.APPLIED,
    "rolled_back": pb.AckUpdateRequest.ROLLED_BACK,
    "rejected": pb.AckUpdateRequest.REJECTED,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}


def ack_to_pb(a: UpdateAck) -> pb.AckUpdateRequest:
    """Domain -> AckUpdateRequest."""
    if a.outcome not in OUTCOMES:
        raise WireFormatError(f"outcome: got {a.outcome!r}, expected one of {OUTCOMES}")
    return pb.AckUpdateRequest(
        version=a.version,
        outcome=_OUTCOME_TO_PB[a.outcome],
        probe_accuracy=a.probe_accuracy,
        previous_probe_accuracy=a.previous_probe_accuracy,
        detail=a.detail,
    )


def ack_from_pb(m: pb.AckUpdateRequest) -> UpdateAck:
    """AckUpdateRequest -> domain, validated."""
    if m.outcome not in _OUTCOME_FROM_PB:
        raise WireFormatError(f"outcome: got {m.outcome}, expected APPLIED/ROLLED_BACK/REJECTED")
    for name in ("probe_accuracy", "previous_probe_accuracy"):
        v = getattr(m, name)
        if not (math.isnan(v) or 0.0 <= v <= 1.0):
            raise WireFormatError(f"{name}: got {v}, expected NaN or in [0, 1]")
    return UpdateAck(
        int(m.version), _OUTCOME_FROM_PB[m.outcome], float(m.probe_accuracy),
        float(m.previous_probe_accuracy), _text(m.detail, "detail", 1024),
    )


def ack_response_to_pb(adapter_version: int) -> pb.AckUpdateResponse:
    """Build the AckUpdate response."""
    return pb.AckUpdateResponse(adapter_version=adapter_version)


def ack_response_from_pb(m: pb.AckUpdateResponse) -> int:
    """AckUpdateResponse -> recorded adapter version."""
    return int(m.adapter_version)


def status_request() -> pb.GetStatusRequest:
    """Build the GetStatus request."""
    return pb.GetStatusRequest()


def status_to_pb(s: DeviceStatus) -> pb.GetStatusResponse:
    """Domain -> GetStatusResponse."""
    return pb.GetStatusResponse(
        device_id=s.device_id,
        adapter_version=s.adapter_version,
        latest_version=s.latest_version,
        pending_samples=s.pending_samples,
        stored_samples=s.stored_samples,
        rounds=s.rounds,
    )


def status_from_pb(m: pb.GetStatusResponse) -> DeviceStatus:
    """GetStatusResponse -> domain."""
    return DeviceStatus(
        m.device_id, int(m.adapter_version), int(m.latest_version), int(m.pending_samples),
        int(m.stored_samples), int(m.rounds),
    )
