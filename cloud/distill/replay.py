"""Source-domain replay pool for AKD: procedural `source` samples as the device would upload them.

Each batch of a round mixes `replay_ratio` of these samples with the uploads so that the adapter
does not drift away from the domain the student was trained on (CD-CCA's replay against
forgetting). The samples come from the procedural generator (by default the zoo's own source
training stream, seed 1 = ZooConfig seed 0), are encoded by the student's vision tower and
projector (the same weights the device and the teacher use, so "projected" tokens), and carry
their ground-truth answer, which the teacher is teacher-forced on when labelling. All frame-grid
tokens are kept (the device sends a compressed subset; the models read any subset in order), and
LLaVA-OneVision's trailing video newline is dropped, as the device never uploads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from cloud.distill.base import DistillSample
from shared.errors import ConfigError
from shared.media import procedural as P
from shared.models.architectures import architecture_of, encode_visual, pixel_keys
from shared.models.processor import VLMProcessor


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """What the replay pool holds."""

    samples: int = 64
    """Pool size; each batch draws its replay share from it with replacement."""
    domain: str = "source"
    seed: int = 1
    """Procedural stream seed (1: the zoo's training stream for ZooConfig seed 0)."""
    media_kind: str = "video"
    batch_size: int = 16
    """Samples per vision-tower forward while building the pool."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise ConfigError(f"`samples` and `batch_size` must be >= 1, got {self.samples} "
                              f"and {self.batch_size}")
        if self.domain not in P.DOMAINS:
            raise ConfigError(f"`domain` must be one of {P.DOMAINS}, got {self.domain!r}")
        if self.media_kind != "video":
            raise ConfigError(f"`media_kind` must be 'video' (uploads are videos), got "
                              f"{self.media_kind!r}")


@torch.no_grad()
def encode_samples(model: nn.Module, processor: VLMProcessor, items: list[P.QASample],
                   *, with_answers: bool = True, batch_size: int = 16) -> list[DistillSample]:
    """DistillSamples of procedural videos: all frame-grid post-projector tokens, in order."""
    drop_newline = architecture_of(model).name == "llava_onevision"
    was_training = model.training
    model.eval()
    out: list[DistillSample] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            inputs = processor(chunk)
            feats = encode_visual(cast(PreTrainedModel, model),
                                  pixel_keys(dict(inputs)))["video"]  # B x (N, D)
            for s, f in zip(chunk, feats, strict=True):
                tokens = (f[:-1] if drop_newline else f).float().cpu().contiguous()  # (K, D)
                out.append(DistillSample(
                    question=s.question, visual_tokens=tokens,
                    positions=torch.arange(tokens.shape[0]),
                    grid=_grid(tokens.shape[0], processor.config.num_frames),
                    reference_answer=s.answer if with_answers else None,
                    feature_space="projected", sample_id=s.sample_id))
    finally:
        model.train(was_training)
    return out


def _grid(tokens: int, frames: int) -> tuple[int, int, int]:
    """(frames, rows, cols) of `tokens` grid tokens: square per-frame grids (LLaVA-OV pooling)."""
    per_frame = tokens // frames
    side = math.isqrt(per_frame)
    if per_frame * frames != tokens:
        raise ConfigError(f"{tokens} visual tokens do not split into {frames} frames")
    return (frames, side, side) if side * side == per_frame else (frames, 1, per_frame)


def source_replay(model: nn.Module, processor: VLMProcessor,
                  config: ReplayConfig) -> list[DistillSample]:
    """The replay pool: `config.samples` procedural samples of `config.domain`, encoded."""
    gen = P.GeneratorConfig(frame_size=processor.config.image_size,
                            num_frames=processor.config.num_frames)
    items = P.batch(config.domain, config.samples, config.seed, config.media_kind, gen)
    return encode_samples(model, processor, items, batch_size=config.batch_size)
