"""Stock transformers VLM classes built from small configs, and what differs between them.

Teacher and student of a zoo are the SAME class with the SAME vision tower AND the SAME
multimodal projector (identical weights, frozen after the vision pre-training stage; their hash
is `vision_sha256` in the config and in `cdca_meta.json`). The language models share the hidden
size and differ in depth and MLP width. So the post-projector, post-pooling visual tokens, exactly
the tokens a device compresses (VidCom2) and uploads, are valid teacher input through
`forward(..., mm_encoder_outputs=...)`: the cloud never needs the raw pixels.

Per architecture (`ARCHITECTURES`):
- `llava_onevision` (primary): SigLIP tower + 2-layer MLP projector + Qwen2 LM. A video frame's
  g x g patch grid is pooled to ceil(g/2)^2 tokens and one newline token closes the video; an
  image is anyres with one crop at the tower's own size: g^2 base tokens + g (g + 1) crop tokens.
- `qwen2_vl`: Qwen2-VL vision transformer (2 x 2 patch merger = projector) + Qwen2 LM with
  M-RoPE; frames are grouped in temporal pairs; images are repeated to a pair.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from shared.errors import ConfigError


@dataclass(frozen=True, slots=True)
class VLMSpec:
    """Sizes of one tiny VLM (the zoo builds a teacher and a student from two of these)."""

    architecture: str = "llava_onevision"
    """Key of `ARCHITECTURES`."""
    image_size: int = 48
    """Frames are resized to image_size x image_size before the vision tower."""
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 3
    text_hidden: int = 128
    """LLM width; equal for teacher and student so the shared projector feeds both."""
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    num_frames: int = 8
    """Frames sampled per video by the processor."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"`architecture` must be one of {sorted(ARCHITECTURES)}, "
                              f"got {self.architecture!r}")
        merge = 2 if self.architecture == "qwen2_vl" else 1
        if self.image_size % (self.patch_size * merge):
            raise ConfigError(f"`image_size` ({self.image_size}) must be a multiple of "
                              f"patch_size * {merge} ({self.patch_size * merge})")
        for name in ("vision_hidden", "text_hidden"):
            heads = self.vision_heads if name == "vision_hidden" else self.text_heads
            if getattr(self, name) % heads:
                raise ConfigError(f"`{name}` ({getattr(self, name)}) must be divisible by "
                                  f"its head count ({heads})")
        if self.text_heads % self.text_kv_heads:
            raise ConfigError(f"`text_heads` ({self.text_heads}) must be a multiple of "
                              f"`text_kv_heads` ({self.text_kv_heads})")
        if self.architecture == "qwen2_vl" and self.num_frames % 2:
            raise ConfigError(f"`num_frames` must be even for qwen2_vl (temporal pairs), "
                              f"got {self.num_frames}")

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON-able)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TokenIds:
    """Special token ids the model config must agree on with the tokenizer."""

    pad: int
    bos: int
    eos: int
    image: int
    video: int
    vision_start: int
    vision_end: int
    vocab_size: int


@dataclass(frozen=True, slots=True)
class Architecture:
    """What differs between the supported model classes."""

    name: str
    model_cls: type[PreTrainedModel]
    build_config: Callable[[VLMSpec, TokenIds], object]
    visual_prefixes: tuple[str, ...]
    """State-dict prefixes of the shared vision tower + projector (+ newline embedding)."""
    tokens_per_video: Callable[[VLMSpec, int], int]
    tokens_per_image: Callable[[VLMSpec], int]


def _llava_ov_config(spec: VLMSpec, ids: TokenIds) -> LlavaOnevisionConfig:
    vision = dict(
        model_type="siglip_vision_model", hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, num_channels=3,
    )
    text = dict(
        model_type="qwen2", vocab_size=ids.vocab_size, hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=True,
        # 1/sqrt(width): the stock 0.02 leaves visual tokens nearly identical at init
        initializer_range=1 / math.sqrt(spec.text_hidden),
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=ids.image,
        video_token_index=ids.video, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[spec.image_size, spec.image_size]],
        tie_word_embeddings=True,
    )


def _qwen2_vl_config(spec: VLMSpec, ids: TokenIds) -> Qwen2VLConfig:
    head_dim = spec.text_hidden // spec.text_heads
    half = head_dim // 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    vision = dict(
        depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden,
        mlp_ratio=2, num_heads=spec.vision_heads, in_channels=3, patch_size=spec.patch_size,
        spatial_merge_size=2, temporal_patch_size=2,
    )
    text = dict(
        vocab_size=ids.vocab_size, hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=1024, initializer_range=1 / math.sqrt(spec.text_hidden),
        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=section),
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
        tie_word_embeddings=True,
    )
    return Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids.image,
        video_token_id=ids.video, vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end, tie_word_embeddings=True,
    )


def _grid(spec: VLMSpec) -> int:
    return spec.image_size // spec.patch_size


ARCHITECTURES: dict[str, Architecture] = {
    "llava_onevision": Architecture(
        name="llava_onevision",
        model_cls=LlavaOnevisionForConditionalGeneration,
        build_config=_llava_ov_config,
        visual_prefixes=("model.vision_tower.", "model.multi_modal_projector.",
                         "model.image_newline"),
        tokens_per_video=lambda s, f: f * math.ceil(_grid(s) / 2) ** 2 + 1,
        tokens_per_image=lambda s: _grid(s) ** 2 + _grid(s) * (_grid(s) + 1),
    ),
    "qwen2_vl": Architecture(
        name="qwen2_vl",
        model_cls=Qwen2VLForConditionalGeneration,
        build_config=_qwen2_vl_config,
        visual_prefixes=("model.visual.",),
        tokens_per_video=lambda s, f: (f // 2) * (_grid(s) // 2) ** 2,
        tokens_per_image=lambda s: (_grid(s) // 2) ** 2,
    ),
}
MODEL_TYPE_TO_ARCH = {"llava_onevision": "llava_onevision", "qwen2_vl": "qwen2_vl"}


def architecture_of(model_or_config: object) -> Architecture:
    """The `Architecture` of a model or config, by its `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_ARCH:
        raise ConfigError(f"model_type {model_type!r} is not supported; "
                          f"expected one of {sorted(MODEL_TYPE_TO_ARCH)}")
    return ARCHITECTURES[MODEL_TYPE_TO_ARCH[model_type]]


def build_vlm(spec: VLMSpec, ids: TokenIds, seed: int) -> PreTrainedModel:
    """A randomly initialised model of `spec` (deterministic given `seed`)."""
    arch = ARCHITECTURES[spec.architecture]
    config = arch.build_config(spec, ids)
    config._attn_implementation = "sdpa"  # noqa: SLF001 - the documented way before init
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = arch.model_cls._from_config(config)
    model.eval()
    return model


def visual_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The shared vision tower + projector parameters (state-dict keys of `visual_prefixes`)."""
    prefixes = architecture_of(model).visual_prefixes
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def visual_hash(model: PreTrainedModel) -> str:
    """sha256 over the shared visual parameters, as float32 bytes in sorted key order.

    Computed in float32 so an fp16 checkpoint and its fp32 load agree; quantized language
    models do not change it (the visual part is never quantized).
    """
    h = hashlib.sha256()
    for key, value in sorted(visual_state(model).items()):
        h.update(key.encode())
        h.update(value.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def encode_visual(model: PreTrainedModel, inputs: dict[str, torch.Tensor]
                  ) -> dict[str, list[torch.Tensor]]:
    """Post-projector visual tokens per sample: {"image"|"video": [(N_i, D), ...]}.

    These are what `mm_encoder_outputs` accepts (see `as_encoder_outputs`).
    """
    out: dict[str, list[torch.Tensor]] = {}
    arch = architecture_of(model)
    if arch.name == "llava_onevision":
        if "pixel_values" in inputs:
            feats = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], return_dict=True).pooler_output
            out["image"] = list(feats)
        if "pixel_values_videos" in inputs:
            feats = model.model.get_video_features(
                inputs["pixel_values_videos"], return_dict=True).pooler_output  # (B, N, D)
            out["video"] = list(feats)
    else:
        if "pixel_values" in inputs:
            out["image"] = list(model.model.get_image_features(
                inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True).pooler_output)
        if "pixel_values_videos" in inputs:
            out["video"] = list(model.model.get_video_features(
                inputs["pixel_values_videos"], inputs["video_grid_thw"],
                return_dict=True).pooler_output)
    return out


def as_encoder_outputs(model: PreTrainedModel, features: dict[str, list[torch.Tensor]]
                       ) -> dict[str, BaseModelOutputWithPooling]:
    """Wrap per-sample visual tokens in the `mm_encoder_outputs` layout the class expects."""
    arch = architecture_of(model)
    out = {}
    for kind, feats in features.items():
        if arch.name == "llava_onevision" and kind == "video":
            # (1, sum N_i, D): LLaVA-OV flattens the first two dims, so counts may differ
            pooled: object = torch.cat(list(feats))[None]
        else:
            pooled = list(feats)
        out[kind] = BaseModelOutputWithPooling(pooler_output=pooled)
    return out


def pixel_keys(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pixel tensors of processor output (what `encode_visual` consumes)."""
    keys = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw",
            "video_grid_thw")
    return {k: v for k, v in inputs.items() if k in keys}


def text_keys(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Processor output minus pixels: what a forward with `mm_encoder_outputs` takes."""
    drop = ("pixel_values", "pixel_values_videos", "image_sizes")
    return {k: v for k, v in inputs.items() if k not in drop}
