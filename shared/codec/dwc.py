"""DWC (dynamic weight-update compression, CD-CCA CVPR'24 §3.4), rebuilt on deltas.

Per tensor, keep the fewest delta entries that carry `energy_share` of its energy (sum of
squares); if the payload would exceed `budget_bytes`, keep a global top-energy prefix of those
candidates, so the budget goes to the tensors with the most energy. Kept values are quantized to
int8 or int4 with one float32 scale per block of `block_size` kept values; indices are a bitmap or
LEB128 gap varints, whichever is smaller per tensor; the whole body is zstd-compressed. What is not
sent (dropped entries and quantization error) is returned as the residual for error feedback.

Body sections per header tensor, in header order: index bytes, scales (float32 LE, one per block),
values (int8, or int4 nibbles value + 8, two per byte, low nibble first). The header names
tensors by position in sorted(base) under the base's layout digest (`container.indexed_entries`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.codec import container, packing
from shared.codec.base import (
    CodecStats,
    EncodedUpdate,
    StateDict,
    TensorStats,
    delta_with_residual,
)
from shared.errors import ConfigError, WireFormatError

_QMAX = {8: 127, 4: 7}
_INDEX_MODES = ("all", "bitmap", "varint")


@dataclass(frozen=True, slots=True)
class DWCConfig:
    """Options of the "dwc" codec."""

    energy_share: float = 0.9
    """Per tensor, the share of delta energy the kept entries must carry, in (0, 1]."""
    budget_bytes: int | None = None
    """Hard cap on the payload size in bytes; None for no cap."""
    bits: int = 8
    """Quantization of kept values: 8 (int8) or 4 (int4)."""
    block_size: int = 64
    """Kept values per float32 scale."""
    zstd_level: int = 9
    """zstd compression level, 1..22."""

    def __post_init__(self) -> None:
        if not 0.0 < self.energy_share <= 1.0:
            raise ConfigError(f"`energy_share` must be in (0, 1], got {self.energy_share}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ConfigError(f"`budget_bytes` must be positive or None, got {self.budget_bytes}")
        if self.bits not in _QMAX:
            raise ConfigError(f"`bits` must be one of {sorted(_QMAX)}, got {self.bits}")
        if not 1 <= self.block_size <= 65536:
            raise ConfigError(f"`block_size` must be in 1..65536, got {self.block_size}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"`zstd_level` must be in 1..22, got {self.zstd_level}")


@dataclass(frozen=True, slots=True)
class _Build:
    payload: bytes
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (indices (k,), dequantized (k,))


class DynamicDeltaCodec:
    """Sparse, quantized, error-feedback delta codec (registry key "dwc")."""

    name = "dwc"

    def __init__(self, config: DWCConfig) -> None:
        self.config = config

    def encode(
        self, new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> EncodedUpdate:
        """Encode `new - base + residual`; see the module docstring for the selection rule."""
        deltas = delta_with_residual(new, base, residual)
        names = list(deltas)
        shapes = {name: list(base[name].shape) for name in names}
        cand_t, cand_i = self._candidates(deltas)
        build = self._build(shapes, deltas, cand_t, cand_i)
        budget = self.config.budget_bytes
        limited = budget is not None and len(build.payload) > budget
        if budget is not None and limited:
            build = self._fit_budget(shapes, deltas, cand_t, cand_i, budget)
        residual_out = {}
        for name in names:
            r = deltas[name].clone()  # (numel,)
            if name in build.kept:
                idx, dq = build.kept[name]
                r[idx] -= dq
            residual_out[name] = r.view(base[name].shape)
        stats = self._stats(build, deltas, residual_out, limited)
        return EncodedUpdate(payload=build.payload, residual=residual_out, stats=stats)

    def decode(self, payload: bytes, base: Mapping[str, torch.Tensor]) -> StateDict:
        """base + decoded delta, in each base tensor's dtype; WireFormatError on bad input."""
        header, sections = container.unpack(payload, container.body_limit(base))
        bits = container.field(header, "bits", int, "header")
        if bits not in _QMAX:
            raise WireFormatError(f"header.bits: got {bits}, expected one of {sorted(_QMAX)}")
        block = container.int_field(header, "block", "header", 1, 65536)
        reader = container.SectionReader(sections)
        out: StateDict = {}
        for i, (row, name) in enumerate(container.indexed_entries(header, self.name, base, 4)):
            where = f"header.t[{i}] ({name})"
            b = base[name]
            numel = b.numel()
            _, count, mode_id, index_bytes = row
            if not 0 <= count <= numel:
                raise WireFormatError(f"{where} count: got {count}, expected 0..{numel}")
            if not 0 <= mode_id < len(_INDEX_MODES):
                raise WireFormatError(f"{where} index mode: got {mode_id}, expected "
                                      f"0..{len(_INDEX_MODES) - 1} {_INDEX_MODES}")
            mode = _INDEX_MODES[mode_id]
            if not 0 <= index_bytes <= 5 * numel:
                raise WireFormatError(f"{where} index bytes: got {index_bytes}, "
                                      f"expected 0..{5 * numel}")
            expected = {"all": 0, "bitmap": (numel + 7) // 8}.get(mode)
            if expected is not None and index_bytes != expected:
                raise WireFormatError(
                    f"{where} index bytes: got {index_bytes}, expected {expected}"
                )
            if mode == "all" and count != numel:
                raise WireFormatError(
                    f"{where} count: got {count}, expected {numel} for index 'all'"
                )
            raw_idx = reader.take(index_bytes, f"{where} indices")
            n_blocks = -(-count // block)
            scales = np.frombuffer(reader.take(4 * n_blocks, f"{where} scales"), dtype="<f4")
            if not (np.isfinite(scales).all() and (scales >= 0).all()):
                raise WireFormatError(f"{where} scales: expected finite and >= 0")
            raw_q = reader.take(count if bits == 8 else (count + 1) // 2, f"{where} values")
            if mode == "all":
                idx = np.arange(numel, dtype=np.int64)
            elif mode == "bitmap":
                idx = packing.bitmap_decode(raw_idx, count, numel, where)
            else:
                idx = packing.varint_gaps_decode(raw_idx, count, numel, where)
            if bits == 8:
                q = np.frombuffer(raw_q, dtype=np.int8)
                if count and int(q.min()) < -127:
                    raise WireFormatError(f"{where} values: int8 -128, expected -127..127")
            else:
                q = packing.int4_unpack(raw_q, count, where)
            step = torch.from_numpy(scales.astype(np.float32)).repeat_interleave(block)[:count]
            dq = torch.from_numpy(q.astype(np.float32)) * step  # (k,)
            if not bool(torch.isfinite(dq).all()):
                raise WireFormatError(f"{where} values: dequantized delta is not finite")
            flat = b.detach().cpu().float().flatten().clone()  # (numel,) decoded on the CPU
            flat.index_add_(0, torch.from_numpy(idx), dq)
            out[name] = flat.view(b.shape).to(device=b.device, dtype=b.dtype)
        reader.finish()
        for name, b in base.items():
            if name not in out:
                out[name] = b.detach().clone()
        return out

    def _candidates(
        self, deltas: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor energy-share sets, merged in global descending energy order.

        Returns (tensor number, flat index), each (M,).
        """
        ts, idxs, energies = [], [], []
        for t, d in enumerate(deltas.values()):
            e = d.double() ** 2  # (numel,)
            total = float(e.sum())
            if total == 0.0:
                continue
            order = torch.argsort(e, descending=True, stable=True)  # (numel,)
            cum = torch.cumsum(e[order], 0)  # (numel,)
            target = torch.tensor([self.config.energy_share * total], dtype=torch.float64)
            # never past the non-zero entries: at energy_share 1.0, rounding in the cumulative
            # sum can leave it below `total` and pull in zeros that carry nothing
            k = min(int(torch.searchsorted(cum, target)) + 1, int((e > 0).sum()))
            ts.append(torch.full((k,), t, dtype=torch.int64))
            idxs.append(order[:k])
            energies.append(e[order[:k]])
        if not ts:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        perm = torch.argsort(torch.cat(energies), descending=True, stable=True)  # (M,)
        return torch.cat(ts)[perm], torch.cat(idxs)[perm]

    def _fit_budget(
        self, shapes: dict[str, list[int]], deltas: dict[str, torch.Tensor], cand_t: torch.Tensor,
        cand_i: torch.Tensor, budget: int,
    ) -> _Build:
        """Largest global prefix of the candidates whose real payload fits (binary search)."""
        lo_build = self._build(shapes, deltas, cand_t[:0], cand_i[:0])
        if len(lo_build.payload) > budget:
            raise ConfigError(
                f"`budget_bytes` {budget} is below the {len(lo_build.payload)}-byte empty payload"
            )
        lo, hi = 0, cand_t.numel()  # payload(lo) fits, payload(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            b = self._build(shapes, deltas, cand_t[:mid], cand_i[:mid])
            if len(b.payload) <= budget:
                lo, lo_build = mid, b
            else:
                hi = mid
        return lo_build

    def _build(
        self, shapes: dict[str, list[int]], deltas: dict[str, torch.Tensor], sel_t: torch.Tensor,
        sel_i: torch.Tensor,
    ) -> _Build:
        """Quantize, pack and frame the selected entries."""
        cfg = self.config
        names = list(shapes)
        counts = torch.bincount(sel_t, minlength=len(names)).tolist()
        order = torch.argsort(sel_t * (1 << 32) + sel_i)  # group by tensor, indices ascending
        grouped = torch.split(sel_i[order], counts)
        # a few hundred kept entries spread over every LoRA tensor: names and shapes in the
        # header cost more than the values, so tensors are rows [id in sorted(base), count,
        # index mode, index bytes] under the layout digest
        ids = {n: i for i, n in enumerate(sorted(names))}
        rows: list[list[int]] = []
        sections: list[bytes] = []
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, idx in zip(names, grouped, strict=True):
            if idx.numel() == 0:
                continue
            d = deltas[name]
            q, scales, dq = _quantize(d[idx], cfg.bits, cfg.block_size)
            idx_np = idx.numpy()
            numel = d.numel()
            if idx.numel() == numel:
                mode, index = "all", b""
            elif (numel + 7) // 8 <= packing.varint_gaps_size(idx_np):
                mode, index = "bitmap", packing.bitmap_encode(idx_np, numel)
            else:
                mode, index = "varint", packing.varint_gaps_encode(idx_np)
            values = q.tobytes() if cfg.bits == 8 else packing.int4_pack(q)
            sections += [index, scales.astype("<f4").tobytes(), values]
            rows.append([ids[name], int(idx.numel()), _INDEX_MODES.index(mode), len(index)])
            kept[name] = (idx, dq)
        header = {"codec": self.name, "bits": cfg.bits, "block": cfg.block_size,
                  "base": container.layout_digest(shapes), "t": rows}
        return _Build(container.pack(header, sections, cfg.zstd_level), kept)

    def _stats(
        self, build: _Build, deltas: dict[str, torch.Tensor], residual: StateDict, limited: bool,
    ) -> CodecStats:
        per: dict[str, TensorStats] = {}
        kept_e = total_e = 0.0
        for name, d in deltas.items():
            e_t = float((d.double() ** 2).sum())
            k_e = float((d[build.kept[name][0]].double() ** 2).sum()) if name in build.kept else 0.0
            per[name] = TensorStats(
                kept=int(build.kept[name][0].numel()) if name in build.kept else 0,
                numel=d.numel(), energy_share=k_e / e_t if e_t > 0 else 1.0,
            )
            kept_e += k_e
            total_e += e_t
        err = math.sqrt(sum(float((r.double() ** 2).sum()) for r in residual.values()))
        numel = sum(d.numel() for d in deltas.values())
        return CodecStats(
            payload_bytes=len(build.payload), dense_fp32_bytes=4 * numel,
            kept=sum(s.kept for s in per.values()), numel=numel,
            energy_share=kept_e / total_e if total_e > 0 else 1.0,
            relative_error=err / math.sqrt(total_e) if total_e > 0 else 0.0,
            budget_limited=limited, tensors=per,
        )


def _quantize(
    v: torch.Tensor, bits: int, block: int,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Symmetric absmax quantization per block: (q int8 (k,), scales f32 (nb,), dequant (k,))."""
    qmax = _QMAX[bits]
    k = v.numel()
    nb = -(-k // block)
    blocks = F.pad(v, (0, nb * block - k)).view(nb, block)  # (nb, block)
    scales = blocks.abs().amax(dim=1) / qmax  # (nb,)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / scales[:, None]).clamp_(-qmax, qmax)  # (nb, block)
    dq = (q * scales[:, None]).flatten()[:k]  # (k,)
    return q.flatten()[:k].to(torch.int8).numpy(), scales.numpy(), dq
