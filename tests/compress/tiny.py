"""Tiny randomly initialised VLMs (real HF classes, built from configs) and inputs for them."""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
IMAGE_ID, VIDEO_ID, VSTART, VEND = VOCAB - 1, VOCAB - 2, VOCAB - 3, VOCAB - 4
_TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS,
    eos_token_id=EOS,
)
_QWEN_IDS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                 vision_start_token_id=VSTART, vision_end_token_id=VEND)
PATCH = 4
"""Qwen vision patch size: a (t, h, w) grid holds t*h*w patches of 3*2*PATCH*PATCH values."""


def _mrope_text() -> dict:
    return dict(_TEXT, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                             mrope_section=[2, 3, 3]))


def tiny_qwen2vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL with a 1-layer vision tower (patch 4, merge 2) and a 2-layer LLM of width 64."""
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=_mrope_text(),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2),
        **_QWEN_IDS,
    )
    return Qwen2VLForConditionalGeneration._from_config(cfg).eval()


def tiny_qwen25vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL, same sizes as `tiny_qwen2vl`."""
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=_mrope_text(),
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                           num_heads=2, patch_size=PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=16, fullatt_block_indexes=[0]),
        **_QWEN_IDS,
    )
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg).eval()


def tiny_llava_ov(seed: int = 0, image_size: int = 32, patch: int = 4) -> (
        LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with a 1-layer SigLIP (32 px, patch 4: 8x8 -> pooled 4x4 per frame)."""
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        text_config=dict(_TEXT, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                           patch_size=patch),
        image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
    )
    return LlavaOnevisionForConditionalGeneration._from_config(cfg).eval()


def qwen_video(t: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Random Qwen `pixel_values_videos` for one (t, h, w) patch grid: (t*h*w, 3*2*P*P)."""
    return torch.randn(t * h * w, 3 * 2 * PATCH * PATCH, generator=gen)


def qwen_prompt(n_visual: int, token_id: int, prefix: list[int], suffix: list[int]) -> list[int]:
    """prefix <vision_start> token_id*n <vision_end> suffix."""
    return prefix + [VSTART] + [token_id] * n_visual + [VEND] + suffix


def pad_batch(seqs: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, padded with PAD on `side`."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s)
        mask[b, sl] = 1
    return ids, mask
