"""Token-compressor contract: what a visual-token compressor sees (VisualBatch) and decides
(KeepPlan).

Compressors are pure tensor code; `device/vlm/` applies their plans to real HF models.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from shared.errors import ConfigError


class Stage(enum.Enum):
    """Where in the model a compressor acts."""

    PRE_LLM = "pre_llm"
    """After the projector, before decoder layer 0 (VidCom2, random, uniform)."""
    IN_LLM = "in_llm"
    """Inside decoder layers, guided by text->visual attention (SparseVLM)."""


@dataclass(frozen=True, slots=True)
class VisualBatch:
    """The visual tokens of ONE video or image, as the compressor sees them.

    An image is one frame (F = 1). Tokens outside the frame grid (LLaVA-OneVision's per-video
    newline) are not part of `embeds`; the model adapter keeps them unconditionally.
    """

    embeds: torch.Tensor
    """(F, N, D) frames x tokens per frame x hidden, post-projector, raster order inside a frame."""
    grid_hw: tuple[int, int] | None = None
    """(H, W) of one frame's token grid (H * W == N) when known; spatial baselines use it."""
    text_attn: torch.Tensor | None = None
    """(Q, F*N) attention of Q text raters over the visual tokens; IN_LLM only."""
    layer: int | None = None
    """Decoder layer index; IN_LLM only."""
    frame_budgets: torch.Tensor | None = None
    """(F,) int64 tokens to keep per frame, set by a budget planner (VidCom2's Frame Compression
    Adjustment, `VidCom2Compressor.frame_budgets`). A compressor that honours it keeps exactly
    `frame_budgets[t]` tokens of frame t (e.g. "vidcom2+sparsevlm")."""

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3 or self.embeds.shape[0] < 1 or self.embeds.shape[1] < 1:
            raise ConfigError(
                f"`embeds` must be (F, N, D) with F, N >= 1, got shape {tuple(self.embeds.shape)}"
            )
        if self.grid_hw is not None and self.grid_hw[0] * self.grid_hw[1] != self.embeds.shape[1]:
            raise ConfigError(
                f"`grid_hw` {self.grid_hw} must multiply to tokens per frame {self.embeds.shape[1]}"
            )
        if self.frame_budgets is not None:
            fb = self.frame_budgets
            if fb.shape != (self.embeds.shape[0],) or bool((fb < 0).any()) or bool(
                (fb > self.embeds.shape[1]).any()
            ):
                raise ConfigError(
                    f"`frame_budgets` must be ({self.embeds.shape[0]},) ints in "
                    f"[0, {self.embeds.shape[1]}], got {fb.tolist()}"
                )

    @property
    def num_frames(self) -> int:
        """F."""
        return int(self.embeds.shape[0])

    @property
    def tokens_per_frame(self) -> int:
        """N."""
        return int(self.embeds.shape[1])


@dataclass(frozen=True, slots=True)
class KeepPlan:
    """A compressor's decision for one VisualBatch."""

    keep: torch.Tensor
    """(K,) int64, sorted unique indices into the F*N visual tokens (frame-major)."""
    frame_counts: torch.Tensor | None = None
    """(F,) int64 kept tokens per frame (sums to K) when the compressor plans per frame."""
    recycled: torch.Tensor | None = None
    """(M, D) merged tokens appended after `keep` (SparseVLM recycling)."""


@runtime_checkable
class TokenCompressor(Protocol):
    """A visual-token compressor. Registered configs all have a `keep_ratio` field in (0, 1]:
    the mean fraction of visual tokens kept, so benchmarks can sweep one budget over all methods."""

    stage: ClassVar[Stage]

    def select(self, batch: VisualBatch) -> KeepPlan:
        """Choose the tokens of `batch` to keep (no I/O, no model code)."""
        ...


def check_keep_ratio(value: float, field: str = "keep_ratio") -> None:
    """Shared validation for the `keep_ratio` field every compressor config carries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"`{field}` must be a number in (0, 1], got {value!r}")
