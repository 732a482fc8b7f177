"""Delta-codec contract (DWC downlink): one implementation, cloud encodes and device decodes.

A codec turns the difference between two adapter state dicts into a self-describing byte payload
(see `shared.codec.container` for the framing) and back. Payloads are never pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shared.errors import IncompatibleUpdateError

StateDict = dict[str, torch.Tensor]

MAX_TENSOR_NUMEL = 2**31 - 1
"""Per-tensor element limit; keeps every index arithmetic of the codecs inside int64."""


@dataclass(frozen=True, slots=True)
class TensorStats:
    """What the encoder kept of one tensor's delta."""

    kept: int
    numel: int
    energy_share: float
    """Sum of squares of the kept (pre-quantization) entries over that of the whole delta; 1.0 if
    the delta is zero."""


@dataclass(frozen=True, slots=True)
class CodecStats:
    """Size and fidelity figures of one encode."""

    payload_bytes: int
    dense_fp32_bytes: int
    """What the same delta costs as raw float32: the compression reference."""
    kept: int
    numel: int
    energy_share: float
    """Kept energy over total delta energy, all tensors together (pre-quantization)."""
    relative_error: float
    """||delta - decoded delta|| / ||delta|| (0.0 for a zero delta); includes quantization."""
    budget_limited: bool
    """True when the byte budget, not the energy share, decided how much was kept."""
    tensors: Mapping[str, TensorStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EncodedUpdate:
    """Result of `DeltaCodec.encode`."""

    payload: bytes
    residual: StateDict
    """float32 per tensor: (delta + incoming residual) - what the payload decodes to. The caller
    keeps it per device and passes it to the next encode (error feedback)."""
    stats: CodecStats


class DeltaCodec(Protocol):
    """Encode `new - base (+ residual)` to bytes; decode bytes onto a base to get new weights.

    Error feedback contract: `residual` is relative to the `base` the caller passes. Either pass
    `base` = the cloud's previous *target* adapter and carry the residual, or pass `base` = an exact
    mirror of what the device holds (previous base + decoded delta) and no residual; mixing the two
    counts the unsent part twice.
    """

    name: str

    def encode(
        self, new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> EncodedUpdate:
        """Encode the delta; raises IncompatibleUpdateError when the dicts do not line up."""
        ...

    def decode(self, payload: bytes, base: Mapping[str, torch.Tensor]) -> StateDict:
        """New weights = base + decoded delta; raises WireFormatError on any malformed payload."""
        ...


def delta_with_residual(
    new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Flat float32 `new - base + residual` per name (sorted), after checking keys/shapes/values."""
    if set(new) != set(base):
        raise IncompatibleUpdateError(
            f"`new` and `base` must hold the same tensors; only in new: "
            f"{sorted(set(new) - set(base))[:5]}, only in base: {sorted(set(base) - set(new))[:5]}"
        )
    if residual is not None and set(residual) != set(base):
        raise IncompatibleUpdateError(
            f"`residual` must hold the same tensors as `base`; got {len(residual)} names vs "
            f"{len(base)}, e.g. missing {sorted(set(base) - set(residual))[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name in sorted(base):
        b, n = base[name], new[name]
        if tuple(n.shape) != tuple(b.shape):
            raise IncompatibleUpdateError(
                f"tensor {name!r}: `new` shape {tuple(n.shape)} != `base` shape {tuple(b.shape)}"
            )
        if not (b.is_floating_point() and n.is_floating_point()):
            raise IncompatibleUpdateError(
                f"tensor {name!r}: expected floating dtypes, got new={n.dtype} base={b.dtype}"
            )
        if b.numel() > MAX_TENSOR_NUMEL:
            raise IncompatibleUpdateError(
                f"tensor {name!r}: numel {b.numel()} exceeds the codec limit {MAX_TENSOR_NUMEL}"
            )
        # on the CPU whatever device the caller's tensors live on: payloads are built there
        d = n.detach().cpu().float().flatten() - b.detach().cpu().float().flatten()  # (numel,)
        if residual is not None:
            r = residual[name]
            if r.numel() != b.numel():
                raise IncompatibleUpdateError(
                    f"tensor {name!r}: residual numel {r.numel()} != base numel {b.numel()}"
                )
            d = d + r.detach().cpu().float().flatten()
        if not bool(torch.isfinite(d).all()):
            raise IncompatibleUpdateError(f"tensor {name!r}: delta has non-finite values")
        out[name] = d
    return out
