"""AKD records and the Distiller protocol (adapter-based knowledge distillation, CD-CCA §3.3)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from cloud.distill.prompt import PromptFormatter
from shared.errors import ConfigError
from shared.types import UploadSample

FEATURE_SPACES = ("projected", "vision")
"""Where uploaded visual tokens live: after the shared projector (fed to the LLM as they are) or
before it (the cloud applies each model's projector per token; only LLaVA-style MLP projectors)."""


@dataclass(frozen=True, slots=True)
class DistillSample:
    """One uploaded sample as the distiller sees it."""

    question: str
    visual_tokens: torch.Tensor
    """(K, D) float: the visual tokens the device kept, in prompt order."""
    positions: torch.Tensor | None = None
    """(K,) int64 ascending indices of the kept tokens in the full token grid (None: all kept).
    LLaVA-OneVision's LLM uses 1-D positions, so only the order matters there; kept for models
    whose rotary positions depend on the grid."""
    grid: tuple[int, ...] = ()
    """(frames, rows, cols) of the full grid, or () when unknown."""
    reference_answer: str | None = None
    """Ground truth when the sample has one (replay data); may replace the teacher's answer."""
    feature_space: str = "projected"
    """One of FEATURE_SPACES."""
    sample_id: str = ""

    @classmethod
    def from_upload(
        cls, sample: UploadSample, reference_answer: str | None = None,
    ) -> DistillSample:
        """The distiller's view of a stored upload (int8 tokens are dequantized)."""
        tokens = sample.tokens
        if tokens is None:
            raise ConfigError(f"sample {sample.sample_id!r} has no visual tokens to distil from")
        return cls(
            question=sample.question,
            visual_tokens=torch.from_numpy(np.ascontiguousarray(tokens.dequantized())),
            positions=torch.from_numpy(np.asarray(tokens.positions, dtype=np.int64)),
            grid=tuple(int(g) for g in tokens.grid),
            reference_answer=reference_answer,
            feature_space=tokens.feature_space,
            sample_id=sample.sample_id,
        )

    def __post_init__(self) -> None:
        if self.visual_tokens.dim() != 2 or not self.visual_tokens.is_floating_point():
            raise ConfigError(
                f"`visual_tokens` must be a (K, D) float tensor, got "
                f"{tuple(self.visual_tokens.shape)} {self.visual_tokens.dtype}"
            )
        if self.positions is not None and tuple(self.positions.shape) != (
                self.visual_tokens.shape[0],):
            raise ConfigError(
                f"`positions` must be ({self.visual_tokens.shape[0]},), got "
                f"{tuple(self.positions.shape)}"
            )
        if self.feature_space not in FEATURE_SPACES:
            raise ConfigError(
                f"`feature_space` must be one of {FEATURE_SPACES}, got {self.feature_space!r}"
            )


@dataclass(frozen=True, slots=True)
class TeacherLabel:
    """What the teacher says about one sample; cacheable (tensors only, on CPU)."""

    answer_ids: torch.Tensor
    """(A,) int64 answer token ids, ending with EOS unless generation hit its length cap."""
    logits: torch.Tensor
    """(A, V) teacher logits at the positions that predict each answer token."""
    hidden: torch.Tensor
    """(K + A, Dt) teacher last hidden states at the K visual positions, then the A positions
    that predict the answer tokens."""


@dataclass(frozen=True, slots=True)
class DistillResult:
    """Outcome of one distillation round."""

    adapter: dict[str, torch.Tensor]
    """peft.get_peft_model_state_dict(student): adapter weights only, detached CPU copies."""
    metrics: Mapping[str, float]
    """Summary: steps, wall_s, first/last values of each loss part (averaged over a window)."""
    history: Sequence[Mapping[str, float]] = field(default_factory=tuple)
    """Per optimizer step: total and each loss part."""


class DataParallel(Protocol):
    """How a fit shares each batch with its peer processes (cloud.distributed implements it
    with torch DDP; `cloud.distill.akd.SingleProcess` is the one-process default)."""

    rank: int
    world_size: int

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to call for the loss; its backward leaves rank-averaged gradients."""
        ...

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of a small CPU tensor over all ranks (for logged figures)."""
        ...


class Distiller(Protocol):
    """Distils a teacher into a student's adapters on uploaded samples."""

    def fit(
        self, student: nn.Module, teacher: nn.Module | None, samples: Sequence[DistillSample],
        *, formatter: PromptFormatter, replay: Sequence[DistillSample] = (),
        labels: Sequence[TeacherLabel] | None = None,
        replay_labels: Sequence[TeacherLabel] | None = None, start_step: int = 0,
        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
        parallel: DataParallel | None = None,
    ) -> DistillResult:
        """Train the student's adapters; return their weights and the loss curve."""
        ...
