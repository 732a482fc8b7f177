"""Packing of selected visual tokens for the wire: int8 with per-token absmax scales, or fp16."""

from __future__ import annotations

import numpy as np
import torch

from shared.errors import ConfigError
from shared.types import VisualTokens


def quantize_int8(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) float -> int8 (K, D) values and float32 (K,) scales with x ~= q * scale."""
    x = features.detach().float()
    scale = x.abs().amax(1).clamp_min(1e-12) / 127.0  # (K,)
    q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (K, D)
    return q.numpy(), scale.numpy().astype(np.float32)


def pack_tokens(features: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int, int],
                feature_space: str, value_dtype: str) -> VisualTokens:
    """VisualTokens for (K, D) kept features at ascending global `positions` of `grid`."""
    if features.dim() != 2 or positions.shape != (features.shape[0],):
        raise ConfigError(f"`features` (K, D) and `positions` (K,) disagree: "
                          f"{tuple(features.shape)} vs {tuple(positions.shape)}")
    pos = positions.to(torch.int64).numpy()
    if value_dtype == "int8":
        values, scales = quantize_int8(features)
        return VisualTokens(values, pos, grid, feature_space, scales)
    if value_dtype == "float16":
        return VisualTokens(features.detach().to(torch.float16).numpy(), pos, grid, feature_space)
    raise ConfigError(f"`value_dtype` must be 'int8' or 'float16', got {value_dtype!r}")
