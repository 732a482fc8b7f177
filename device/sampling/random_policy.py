"""Random uplink selection, the control for UTS at the same byte budget.

Per round of `round_size` samples it uploads `round_budget` of them and, of each, as many visual
tokens as fit in `token_budget_bytes`, exactly like UTS in budget mode, but both choices are
uniform at random instead of by confidence and attention. Draws are keyed by (seed, sample id),
so a sample's fate does not depend on which process or batch saw it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from device.sampling.base import InferenceRecord, Selection
from device.sampling.uncertainty import (
    UncertaintySampler,
    UncertaintySamplerConfig,
    token_bytes,
    tokens_within_budget,
)
from shared.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RandomSamplerConfig(UncertaintySamplerConfig):
    """UTS budget-mode fields (`round_size`, `round_budget`, `token_budget_bytes`) plus a seed."""

    mode: str = "budget"
    seed: int = 0

    def __post_init__(self) -> None:
        super(RandomSamplerConfig, self).__post_init__()
        if self.mode != "budget":
            raise ConfigError(f"`mode` must be 'budget' for the random sampler (it draws "
                              f"`round_budget` of every `round_size`), got {self.mode!r}")


def _key(seed: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class RandomSampler(UncertaintySampler):
    """Registry key "random". A UncertaintySampler so the agent's confidence log still works;
    never calibrated (budget mode)."""

    config: RandomSamplerConfig

    def __init__(self, config: RandomSamplerConfig, dim: int | None = None) -> None:
        super().__init__(config, dim)

    def calibrated_to(self, threshold: float) -> RandomSampler:
        return RandomSampler(dataclasses.replace(self.config, threshold=threshold), self.dim)

    def select(self, records: Sequence[InferenceRecord]) -> list[Selection]:
        """`round_budget / round_size` of the records, random tokens within the byte budget."""
        cfg = self.config
        if self.dim is None:
            raise ConfigError("sampler `dim` (visual token width) is unset")
        budget = round(cfg.round_budget * len(records) / cfg.round_size)
        keys = [_key(cfg.seed, r.sample_id) for r in records]
        chosen = sorted(sorted(range(len(records)), key=lambda i: keys[i])[:budget])
        per_token = token_bytes(self.dim, cfg.value_dtype)
        out = []
        for i in chosen:
            rec = records[i]
            gen = torch.Generator().manual_seed(keys[i] & 0x7FFF_FFFF_FFFF_FFFF)
            scores = torch.rand(rec.keep.shape, generator=gen)  # (K,) random ranks
            out.append(Selection(rec.sample_id, self.confidence(rec),
                                 tokens_within_budget(scores, per_token, cfg.token_budget_bytes,
                                                      cfg.min_tokens)))
        return out
