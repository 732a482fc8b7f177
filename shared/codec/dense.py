"""Baseline codec "dense-fp16": every tensor's full delta as float16 (what DWC is measured against).

Body sections: per header tensor, numel float16 little-endian values (the delta, row-major).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from shared.codec import container
from shared.codec.base import (
    CodecStats,
    EncodedUpdate,
    StateDict,
    TensorStats,
    delta_with_residual,
)
from shared.errors import ConfigError, IncompatibleUpdateError, WireFormatError

_FP16_MAX = 65504.0


@dataclass(frozen=True, slots=True)
class DenseFp16Config:
    """Options of the "dense-fp16" codec."""

    zstd_level: int = 3
    """zstd compression level, 1..22."""

    def __post_init__(self) -> None:
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"`zstd_level` must be in 1..22, got {self.zstd_level}")


class DenseFp16Codec:
    """All of the delta, rounded to float16 (registry key "dense-fp16")."""

    name = "dense-fp16"

    def __init__(self, config: DenseFp16Config) -> None:
        self.config = config

    def encode(
        self, new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> EncodedUpdate:
        """Encode `new - base + residual` densely; the residual is the float16 rounding error."""
        deltas = delta_with_residual(new, base, residual)
        entries, sections, residual_out, per = [], [], {}, {}
        for name, d in deltas.items():
            peak = float(d.abs().max()) if d.numel() else 0.0
            if peak > _FP16_MAX:
                raise IncompatibleUpdateError(
                    f"tensor {name!r}: |delta| {peak:.3g} exceeds the float16 range {_FP16_MAX}"
                )
            half = d.to(torch.float16)  # (numel,)
            sections.append(half.numpy().astype("<f2").tobytes())
            entries.append({"name": name, "shape": list(base[name].shape)})
            residual_out[name] = (d - half.float()).view(base[name].shape)
            per[name] = TensorStats(kept=d.numel(), numel=d.numel(), energy_share=1.0)
        header = {"codec": self.name, "tensors": entries}
        payload = container.pack(header, sections, self.config.zstd_level)
        total = sum(float((d.double() ** 2).sum()) for d in deltas.values())
        err = sum(float((r.double() ** 2).sum()) for r in residual_out.values())
        numel = sum(d.numel() for d in deltas.values())
        stats = CodecStats(
            payload_bytes=len(payload), dense_fp32_bytes=4 * numel, kept=numel, numel=numel,
            energy_share=1.0, relative_error=(err / total) ** 0.5 if total > 0 else 0.0,
            budget_limited=False, tensors=per,
        )
        return EncodedUpdate(payload=payload, residual=residual_out, stats=stats)

    def decode(self, payload: bytes, base: Mapping[str, torch.Tensor]) -> StateDict:
        """base + float16 delta, in each base tensor's dtype; WireFormatError on bad input."""
        header, sections = container.unpack(payload, container.body_limit(base))
        reader = container.SectionReader(sections)
        out: StateDict = {}
        for i, (_, name) in enumerate(container.tensor_entries(header, self.name, base)):
            b = base[name]
            raw = reader.take(2 * b.numel(), f"header.tensors[{i}] values")
            d = np.frombuffer(raw, dtype="<f2").astype(np.float32)  # (numel,)
            if not np.isfinite(d).all():
                raise WireFormatError(f"header.tensors[{i}] values: expected finite float16")
            new = b.detach().cpu().float() + torch.from_numpy(d).view(b.shape)
            out[name] = new.to(device=b.device, dtype=b.dtype)
        reader.finish()
        for name, b in base.items():
            if name not in out:
                out[name] = b.detach().clone()
        return out
