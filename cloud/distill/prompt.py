"""Token sequences for distillation: prompt ids around K visual placeholders, answer ids.

Layout (the zoo processor's `prompt_layout`): `visual_first` is
<bos> [prefix] K x <visual> [suffix] question <ans> | answer <eos>; `question_first` puts the
question right after <bos>; `question_both` puts it on both sides of the visual block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import ConfigError
from shared.models.processor import PROMPT_LAYOUTS as LAYOUTS


@dataclass(frozen=True)
class PromptFormatter:
    """Tokenizes questions/answers and lays out visual placeholders (no model code)."""

    tokenizer: Any
    """A Hugging Face tokenizer: `tokenizer(text, add_special_tokens=False).input_ids`."""
    visual_id: int
    """Placeholder id the visual tokens replace (the model's image or video token)."""
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    answer_id: int | None = None
    """Separator after the question; generation starts after it."""
    visual_prefix: tuple[int, ...] = ()
    visual_suffix: tuple[int, ...] = ()
    layout: str = "visual_first"
    """Where the question sits relative to the visual block (one of LAYOUTS)."""
    full_visual: int | None = None
    """Placeholders of the uncompressed visual block (grid tokens plus any closing extras, e.g.
    LLaVA-OV's video newline). With it, `pack` gives uploaded tokens the positions they had in
    the full prompt (1-D RoPE) instead of renumbering them compactly; None: compact."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"`layout` must be one of {LAYOUTS}, got {self.layout!r}")

    @classmethod
    def from_processor(cls, processor: Any, media_kind: str = "video") -> PromptFormatter:
        """Same layout as `shared.models.processor.VLMProcessor` (duck-typed, LLaVA-OV)."""
        if media_kind not in ("video", "image"):
            raise ConfigError(f"`media_kind` must be 'video' or 'image', got {media_kind!r}")
        return cls(
            tokenizer=processor.tokenizer,
            visual_id=processor.video_id if media_kind == "video" else processor.image_id,
            eos_id=processor.eos_id, pad_id=processor.pad_id, bos_id=processor.bos_id,
            answer_id=processor.answer_id, layout=processor.config.prompt_layout,
            full_visual=(processor.num_visual_tokens(media_kind)
                         if processor.config.architecture == "llava_onevision" else None),
        )

    def prompt_ids(self, question: str, num_visual: int) -> list[int]:
        """Prompt up to and including the answer separator."""
        q = list(self.tokenizer(question, add_special_tokens=False).input_ids)
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.answer_id is None else [self.answer_id]
        visual = [*self.visual_prefix, *([self.visual_id] * num_visual), *self.visual_suffix]
        if self.layout == "question_first":
            return [*head, *q, *visual, *tail]
        if self.layout == "question_both":
            return [*head, *q, *visual, *q, *tail]
        return [*head, *visual, *q, *tail]

    def answer_ids(self, text: str) -> list[int]:
        """Answer tokens followed by EOS."""
        return [*self.tokenizer(text, add_special_tokens=False).input_ids, self.eos_id]


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Right-padded batch of prompt + answer sequences and where each part sits."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    visual_positions: list[torch.Tensor]  # per sample (K_i,) indices into L
    answer_positions: list[torch.Tensor]  # per sample (A_i,) positions predicting answer tokens
    answer_ids: list[torch.Tensor]  # per sample (A_i,)
    position_ids: torch.Tensor  # (B, L) RoPE positions (0 on padding)


def _positions(length: int, where: torch.Tensor, kept: torch.Tensor | None,
               full_visual: int | None) -> torch.Tensor:
    """(length,) positions of one sequence: compact, or with the kept visual tokens at their
    full-prompt positions and the text after the block shifted past the full block."""
    pos = torch.arange(length)
    if kept is None or full_visual is None or where.numel() == 0:
        return pos
    if kept.numel() != where.numel() or int(kept.max()) >= full_visual or bool(
            (kept[1:] <= kept[:-1]).any()):
        raise ConfigError(
            f"visual positions must be {where.numel()} ascending indices below {full_visual}, "
            f"got {kept.tolist()[:8]}{'...' if kept.numel() > 8 else ''}"
        )
    start, end = int(where[0]), int(where[-1]) + 1
    pos[start:end] = start + kept
    pos[end:] += full_visual - where.numel()
    return pos


def pack(
    formatter: PromptFormatter, questions: Sequence[str], num_visual: Sequence[int],
    answers: Sequence[torch.Tensor], positions: Sequence[torch.Tensor | None] = (),
) -> PackedBatch:
    """Build ids for `prompt + answer` per sample, right-padded with `pad_id`.

    positions[i]: (K_i,) ascending indices of sample i's visual tokens in the full token grid
    (used when `formatter.full_visual` is set; missing or None: compact positions).
    """
    kept = list(positions) or [None] * len(questions)
    seqs, vis, ans_pos, rows_pos = [], [], [], []
    for q, k, a, p in zip(questions, num_visual, answers, kept, strict=True):
        prompt = formatter.prompt_ids(q, k)
        ids = prompt + a.tolist()
        where = torch.nonzero(torch.tensor(prompt) == formatter.visual_id).flatten()  # (K,)
        if where.numel() != k:
            raise ConfigError(
                f"question {q[:40]!r} tokenizes to the visual placeholder id "
                f"{formatter.visual_id}; expected exactly {k} placeholders in the prompt"
            )
        seqs.append(ids)
        vis.append(where)
        ans_pos.append(torch.arange(len(prompt) - 1, len(prompt) - 1 + a.numel()))
        rows_pos.append(_positions(len(ids), where, p, formatter.full_visual))
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), formatter.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    pos = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        pos[i, : len(s)] = rows_pos[i]
    return PackedBatch(input_ids, mask, vis, ans_pos, [a.long() for a in answers], pos)
