"""Compressed inference on the device: answer, confidence signals and token relevance per sample.

One batch = processor -> encode (torch, or the ONNX vision session) -> token compressor ->
greedy `generate` on the kept tokens -> one teacher-forced scoring pass over prompt + answer with
eager attention. The scoring pass yields, per sample, the answer's token log-probs and entropies
(UTS stage 1) and the mean attention of the answer positions over the kept visual tokens (UTS
stage 2). Visual tokens outside the frame grid (LLaVA-OV's video newline) are never uploadable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from device.compress.base import TokenCompressor
from device.runtime.loader import Student
from device.sampling.base import InferenceRecord
from device.vlm.archs import VisualItem
from device.vlm.compressed import CompressedVLM
from shared.errors import ConfigError

Encoder = Callable[[Mapping[str, Any]], dict[str, list[VisualItem]]]


@dataclass(frozen=True, slots=True)
class Inference:
    """The device's result on one sample."""

    answer: str
    record: InferenceRecord
    features: torch.Tensor
    """(K, D) float32 kept post-projector tokens of the frame grid, in `record.keep` order."""
    grid: tuple[int, int, int]
    """(frames, rows, cols) of the full frame-token grid `record.keep` indexes."""
    media_kind: str
    visual_tokens_in: int
    """Visual tokens before compression (all of them, extras included)."""


class DeviceInference:
    """Runs the student with a pre-LLM token compressor, batch by batch."""

    def __init__(self, student: Student, compressor: TokenCompressor, max_new_tokens: int = 4,
                 encoder: Encoder | None = None, feature_space: str = "projected",
                 original_positions: bool = True) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        self.student = student
        self.cvlm = CompressedVLM(student.model, compressor,
                                  original_positions=original_positions)
        self.max_new_tokens = max_new_tokens
        self._encode: Encoder = encoder or self.cvlm.encode
        tok = student.processor.tokenizer
        self._eos = student.processor.eos_id
        self._pad = student.processor.pad_id
        self._vocab = len(tok)
        proc = student.processor
        # the answer must never contain a visual placeholder: the scoring pass would count it
        self._suppress = sorted({proc.image_id, proc.video_id, proc.vision_start_id,
                                 proc.vision_end_id, proc.answer_id, proc.bos_id})
        self.feature_space = feature_space
        """`VisualTokens.feature_space` of uploads: "projected" = post-projector (post-pooling)
        tokens, valid teacher input because teacher and student share tower and projector."""

    @torch.no_grad()
    def run(self, frames: Sequence[torch.Tensor], questions: Sequence[str],
            sample_ids: Sequence[str]) -> list[Inference]:
        """Answers and UTS signals for one batch (all images or all videos)."""
        inputs = self.student.processor((list(frames), list(questions)))
        items = self._encode(inputs)
        keeps = self.cvlm.select(items)
        ci = self.cvlm.build(inputs, items, keeps)
        seqs = self.student.model.generate(**ci.model_kwargs(), max_new_tokens=self.max_new_tokens,
                                           do_sample=False, pad_token_id=self._pad,
                                           suppress_tokens=self._suppress)
        prompt_len = ci.input_ids.shape[1]
        new = seqs[:, prompt_len:]  # (B, T)
        valid = self._answer_mask(new)  # (B, T)
        full = torch.cat([ci.input_ids, new], 1)  # (B, L + T)
        mask = torch.cat([ci.attention_mask, valid.long()], 1)  # (B, L + T)
        kwargs: dict[str, Any] = {"input_ids": full, "attention_mask": mask,
                                  "mm_encoder_outputs": ci.mm_encoder_outputs,
                                  **self.cvlm.adapter.text_kwargs(full)}
        if ci.position_ids is not None:  # explicit positions: the answer continues the prompt
            pos = ci.position_ids  # (3, B, L) M-RoPE or (B, L) original 1-D positions
            step = torch.arange(1, new.shape[1] + 1, dtype=pos.dtype)  # (T,)
            kwargs["position_ids"] = torch.cat([pos, pos[..., -1:] + step], -1)  # (..., L + T)
        out = self.student.model(**kwargs, output_attentions=True)
        # logits at position p predict token p + 1: the answer is predicted from L - 1 on
        logits = out.logits[:, prompt_len - 1: prompt_len - 1 + new.shape[1]].float()  # (B, T, V)
        logp = torch.log_softmax(logits, -1)  # (B, T, V)
        tok_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, T)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
        attn = self._answer_attention(out.attentions, prompt_len, valid)  # (B, L + T)
        answers = self.student.processor.decode_answers(new.masked_fill(~valid, self._pad))
        results = []
        for b, sid in enumerate(sample_ids):
            kv = [k for k in ci.for_sample(b)]
            if len(kv) != 1:
                raise ConfigError(f"sample {sid!r} has {len(kv)} visual items, expected 1")
            item = kv[0]
            placeholder = self.cvlm.adapter.token_id(item.modality)
            cols = ((full[b] == placeholder) & mask[b].bool()).nonzero().squeeze(1)  # (K + x,)
            scores = attn[b, cols]  # (K + x,) in placeholder order == item.keep order
            grid_n = item.frames * item.tokens_per_frame
            in_grid = item.keep < grid_n  # extras (video newline) are not uploadable
            n = int(valid[b].sum())
            hw = item.grid_hw or (1, item.tokens_per_frame)
            record = InferenceRecord(
                sample_id=sid, token_logprobs=tok_logp[b, :n].clone(),
                token_entropy=entropy[b, :n].clone(), vocab_size=self._vocab,
                token_scores=scores[in_grid].clone(), keep=item.keep[in_grid].clone())
            results.append(Inference(
                answer=answers[b], record=record, features=item.features[in_grid].float(),
                grid=(item.frames, hw[0], hw[1]), media_kind=item.modality,
                visual_tokens_in=item.num_tokens))
        return results

    def _answer_mask(self, new: torch.Tensor) -> torch.Tensor:
        """(B, T) True for generated tokens up to and including the first EOS."""
        is_eos = new == self._eos  # (B, T)
        before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # (B, T) EOS seen strictly before
        return before == 0

    @staticmethod
    def _answer_attention(attentions: Sequence[torch.Tensor] | None, prompt_len: int,
                          valid: torch.Tensor) -> torch.Tensor:
        """(B, L + T) mean attention paid by the answer-predicting positions to every key."""
        if not attentions or attentions[0] is None:
            raise ConfigError("the student returned no attentions; load it with "
                              "`attention_scores = true` (eager text attention)")
        a = torch.stack([x.float() for x in attentions]).mean((0, 2))  # (B, Lq, Lk)
        t = valid.shape[1]
        rows = a[:, prompt_len - 1: prompt_len - 1 + t]  # (B, T, Lk)
        w = valid.float().unsqueeze(-1)  # (B, T, 1)
        return (rows * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, Lk)
