"""UTS, uncertainty-guided token sampling (Wang et al., CVPR 2024, arXiv:2312.16279), fixed.

Stage 1 (sample level) ranks answers by a *length-normalised* confidence, the geometric-mean
token probability exp(mean log p) or 1 - mean entropy / log V, instead of the official code's
product of max-probabilities, which penalises long answers. Samples are uploaded below a
threshold calibrated as a quantile of confidences on source-domain data, or the least confident
`round_budget` of every round of `round_size` samples.

Stage 2 (token level) keeps, within a byte budget, the visual tokens the answer attended to most
(mean attention of the answer positions over layers and heads, after the compressor). The
official MC-dropout on a bare feature tensor reduces to the squared token norm; attention is a
signal computed by the model itself. Unselected tokens are not sent at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from device.sampling.base import InferenceRecord, Selection
from shared.errors import ConfigError

SIGNALS = ("logprob", "entropy")
MODES = ("threshold", "budget")
VALUE_DTYPES = ("int8", "float16")
POSITION_BYTES = 8
"""Positions travel as int64 (cdca.v1 VisualTokens.positions)."""


@dataclass(frozen=True, slots=True)
class UncertaintySamplerConfig:
    """Settings of the two UTS stages."""

    signal: str = "logprob"
    """"logprob": exp(mean token log-prob); "entropy": 1 - mean entropy / log V."""
    mode: str = "threshold"
    """"threshold": upload every sample below `threshold`; "budget": per round of `round_size`
    samples, upload the `round_budget` least confident."""
    threshold: float | None = None
    """Confidence below which a sample is uploaded; None until calibrated (`calibrated`)."""
    calibration_quantile: float = 0.2
    """Quantile of source-domain confidences that becomes the threshold (about this fraction of
    in-distribution samples would be uploaded)."""
    round_size: int = 32
    round_budget: int = 4
    token_budget_bytes: int = 1536
    """Bytes of visual-token payload per uploaded sample (values + scales + positions)."""
    value_dtype: str = "int8"
    """"int8" (per-token absmax scale, float32) or "float16"."""
    min_tokens: int = 1

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ConfigError(f"`signal` must be one of {SIGNALS}, got {self.signal!r}")
        if self.mode not in MODES:
            raise ConfigError(f"`mode` must be one of {MODES}, got {self.mode!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"`threshold` must be in [0, 1] or None, got {self.threshold}")
        if not 0.0 < self.calibration_quantile < 1.0:
            raise ConfigError(f"`calibration_quantile` must be in (0, 1), "
                              f"got {self.calibration_quantile}")
        if self.round_size < 1 or not 0 <= self.round_budget <= self.round_size:
            raise ConfigError(f"`round_budget` must be in [0, round_size={self.round_size}] and "
                              f"`round_size` >= 1, got {self.round_budget}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"`value_dtype` must be one of {VALUE_DTYPES}, "
                              f"got {self.value_dtype!r}")
        if self.min_tokens < 1:
            raise ConfigError(f"`min_tokens` must be >= 1, got {self.min_tokens}")
        if self.token_budget_bytes < 1:
            raise ConfigError(f"`token_budget_bytes` must be >= 1, got {self.token_budget_bytes}")


def sequence_confidence(logprobs: torch.Tensor, entropy: torch.Tensor, vocab_size: int,
                        signal: str) -> float:
    """Length-normalised confidence in [0, 1] of one answer ((T,) inputs)."""
    if signal == "logprob":
        return float(torch.exp(logprobs.double().mean()).clamp(0.0, 1.0))
    return float((1.0 - entropy.double().mean() / math.log(vocab_size)).clamp(0.0, 1.0))


def token_bytes(dim: int, value_dtype: str) -> int:
    """Wire bytes of one uploaded visual token of width `dim`."""
    if value_dtype == "int8":
        return dim + 4 + POSITION_BYTES  # int8 values + float32 scale + int64 position
    return 2 * dim + POSITION_BYTES


def tokens_within_budget(scores: torch.Tensor, per_token_bytes: int, budget_bytes: int,
                         min_tokens: int = 1) -> torch.Tensor:
    """(K',) ascending positions of the highest-scoring tokens that fit in `budget_bytes`."""
    k = int(scores.numel())
    n = max(min_tokens, budget_bytes // per_token_bytes)
    n = min(n, k)
    top = torch.topk(scores.float(), n, sorted=False).indices  # (n,)
    return torch.sort(top).values


class UncertaintySampler:
    """Registry key "uts"."""

    def __init__(self, config: UncertaintySamplerConfig, dim: int | None = None) -> None:
        self.config = config
        self.dim = dim
        """Visual token width D; set by the agent once the model is loaded."""

    def calibrated(self, source_confidences: Sequence[float]) -> UncertaintySampler:
        """A sampler whose threshold is the configured quantile of `source_confidences`."""
        if len(source_confidences) < 2:
            raise ConfigError(f"calibration needs >= 2 source confidences, "
                              f"got {len(source_confidences)}")
        q = torch.quantile(torch.tensor(source_confidences, dtype=torch.float64),
                           self.config.calibration_quantile)
        return UncertaintySampler(dataclasses.replace(self.config, threshold=float(q)), self.dim)

    def calibrated_to(self, threshold: float) -> UncertaintySampler:
        """A sampler with a previously calibrated `threshold`."""
        return UncertaintySampler(dataclasses.replace(self.config, threshold=threshold), self.dim)

    def confidence(self, record: InferenceRecord) -> float:
        """Length-normalised confidence of the record's answer."""
        return sequence_confidence(record.token_logprobs, record.token_entropy,
                                   record.vocab_size, self.config.signal)

    def select(self, records: Sequence[InferenceRecord]) -> list[Selection]:
        """Stage 1 then stage 2 on one round of records."""
        cfg = self.config
        conf = [self.confidence(r) for r in records]
        if cfg.mode == "threshold":
            if cfg.threshold is None:
                raise ConfigError("`threshold` is None: calibrate on source data or set it")
            chosen = [i for i, c in enumerate(conf) if c < cfg.threshold]
        else:
            budget = round(cfg.round_budget * len(records) / cfg.round_size)
            chosen = sorted(sorted(range(len(records)), key=lambda i: conf[i])[:budget])
        if self.dim is None:
            raise ConfigError("sampler `dim` (visual token width) is unset")
        per_token = token_bytes(self.dim, cfg.value_dtype)
        return [Selection(records[i].sample_id, conf[i],
                          tokens_within_budget(records[i].token_scores, per_token,
                                               cfg.token_budget_bytes, cfg.min_tokens))
                for i in chosen]
