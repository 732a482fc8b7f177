"""Uplink-selection contract (UTS): what inference tells a sampler, and what it decides.

A sampler is pure: it sees per-sample records of the device's own inference (answer token
log-probabilities and entropies, a per-visual-token relevance signal) and returns which samples
to upload and which of their visual tokens. Packing and I/O happen in `device/agent.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.errors import ConfigError


@dataclass(frozen=True, slots=True)
class InferenceRecord:
    """The device's inference on one sample, reduced to what uplink selection needs."""

    sample_id: str
    token_logprobs: torch.Tensor
    """(T,) log-probability of each generated answer token (EOS included) under the device."""
    token_entropy: torch.Tensor
    """(T,) predictive entropy (nats) at each generated position."""
    vocab_size: int
    """V, for normalising entropies by log(V)."""
    token_scores: torch.Tensor
    """(K,) per kept visual token relevance (answer->visual attention); same order as `keep`."""
    keep: torch.Tensor
    """(K,) int64 ascending indices of the tokens the compressor kept, into the F*M frame grid."""

    def __post_init__(self) -> None:
        t = self.token_logprobs.shape
        if self.token_logprobs.dim() != 1 or t[0] < 1 or self.token_entropy.shape != t:
            raise ConfigError(f"`token_logprobs`/`token_entropy` must both be (T,) with T >= 1, "
                              f"got {tuple(t)} and {tuple(self.token_entropy.shape)}")
        if self.token_scores.dim() != 1 or self.token_scores.shape != self.keep.shape:
            raise ConfigError(f"`token_scores` must be (K,) like `keep`, got "
                              f"{tuple(self.token_scores.shape)} vs {tuple(self.keep.shape)}")
        if self.vocab_size < 2:
            raise ConfigError(f"`vocab_size` must be >= 2, got {self.vocab_size}")


@dataclass(frozen=True, slots=True)
class Selection:
    """One sample chosen for upload."""

    sample_id: str
    confidence: float
    """The length-normalised confidence in [0, 1] that ranked it."""
    tokens: torch.Tensor
    """(K',) int64 ascending positions into the record's `keep` (not into the grid)."""


class Sampler(Protocol):
    """Chooses, among one round of records, which samples and tokens go up the link."""

    def confidence(self, record: InferenceRecord) -> float:
        """Length-normalised confidence of the device's answer, in [0, 1]."""
        ...

    def select(self, records: Sequence[InferenceRecord]) -> list[Selection]:
        """The samples of this round to upload (no I/O)."""
        ...
