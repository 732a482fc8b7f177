"""Reference points for visual-token compression at a given budget: keep all, random,
uniform stride.

VidCom2's paper compares against random selection at the same retention ratio; the uniform stride
baseline is the spatial-pooling/striding family (keep evenly spaced tokens of every frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from device.compress.base import KeepPlan, Stage, VisualBatch, check_keep_ratio
from device.compress.vidcom2 import exact_total, reconcile_budgets
from shared.errors import ConfigError


def even_budgets(frames: int, tokens_per_frame: int, keep_ratio: float) -> torch.Tensor:
    """(F,) int64 per-frame budgets summing to round(keep_ratio * F * N), as equal as possible."""
    total = exact_total(keep_ratio, frames * tokens_per_frame)
    quotas = torch.full((frames,), total / frames, dtype=torch.float64)  # (F,)
    return reconcile_budgets(quotas.floor().long(), quotas, tokens_per_frame, total)


@dataclass(frozen=True, slots=True)
class NoCompressionConfig:
    """The uncompressed model ("none"): every visual token reaches the LLM."""


class NoCompressor:
    """Keeps every token (registry key "none")."""

    stage: ClassVar[Stage] = Stage.PRE_LLM

    def __init__(self, cfg: NoCompressionConfig) -> None:
        self.cfg = cfg

    def select(self, batch: VisualBatch) -> KeepPlan:
        """Keep all F*N tokens."""
        t, m = batch.num_frames, batch.tokens_per_frame
        return KeepPlan(keep=torch.arange(t * m), frame_counts=torch.full((t,), m))


@dataclass(frozen=True, slots=True)
class RandomConfig:
    """Uniformly random tokens of the whole video at the same total budget."""

    keep_ratio: float = 0.25
    """Fraction of the video's visual tokens kept (exactly round(keep_ratio * F * N))."""
    seed: int = 0
    """Seed of the compressor's own generator: a run is reproducible, videos differ."""

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"`seed` must be a non-negative int, got {self.seed!r}")


class RandomCompressor:
    """Random selection (registry key "random")."""

    stage: ClassVar[Stage] = Stage.PRE_LLM

    def __init__(self, cfg: RandomConfig) -> None:
        self.cfg = cfg
        self._gen = torch.Generator().manual_seed(cfg.seed)

    def select(self, batch: VisualBatch) -> KeepPlan:
        """Keep round(keep_ratio * F * N) tokens drawn without replacement."""
        t, m = batch.num_frames, batch.tokens_per_frame
        k = exact_total(self.cfg.keep_ratio, t * m)
        keep = torch.randperm(t * m, generator=self._gen)[:k].sort().values  # (K,)
        counts = torch.bincount(keep // m, minlength=t)  # (F,)
        return KeepPlan(keep=keep, frame_counts=counts)


@dataclass(frozen=True, slots=True)
class UniformConfig:
    """Evenly strided tokens of every frame at the same total budget."""

    keep_ratio: float = 0.25
    """Fraction of the video's visual tokens kept (exactly round(keep_ratio * F * N))."""

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)


class UniformCompressor:
    """Stride selection (registry key "uniform"): each frame keeps an equal share of the budget,
    taken at evenly spaced raster positions, i.e. a staggered stride over the token grid."""

    stage: ClassVar[Stage] = Stage.PRE_LLM

    def __init__(self, cfg: UniformConfig) -> None:
        self.cfg = cfg

    def select(self, batch: VisualBatch) -> KeepPlan:
        """Keep evenly spaced tokens in each frame, centred in their stride cells."""
        t, m = batch.num_frames, batch.tokens_per_frame
        ks = (batch.frame_budgets if batch.frame_budgets is not None
              else even_budgets(t, m, self.cfg.keep_ratio))
        parts = []
        for f, k in enumerate(ks.tolist()):
            if k:
                pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * m / k).floor().long()  # (k,)
                parts.append(pos + f * m)
        keep = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        return KeepPlan(keep=keep, frame_counts=ks.to(torch.int64))
