"""Per-architecture facts for pre-LLM token compression: how to encode visual inputs into
post-projector tokens, how those tokens split into frames, and how to hand kept tokens back.

Only public HF methods are used (`get_image_features`, `get_video_features`, `get_rope_index`);
no forward function is copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from shared.errors import ConfigError

MODALITIES: tuple[str, ...] = ("image", "video")


@dataclass(frozen=True, slots=True)
class VisualItem:
    """One image or video of a batch after the vision tower and projector."""

    modality: str
    """"image" or "video"."""
    features: torch.Tensor
    """(N, D) post-projector tokens in placeholder order: F*M frame tokens, then `extra` tokens."""
    frames: int
    """F: frames (Qwen: temporal patches of 2 frames; images: 1)."""
    tokens_per_frame: int
    """M: tokens of one frame, raster order."""
    grid_hw: tuple[int, int] | None
    """(H, W) of one frame's token grid, when the tokens form one."""
    extra: int = 0
    """Trailing tokens outside the frame grid that are always kept (LLaVA-OV's video newline)."""
    grid_thw: tuple[int, int, int] | None = None
    """Qwen's (t, h, w) patch grid (before the 2x2 merge)."""

    @property
    def num_tokens(self) -> int:
        """N = F * M + extra."""
        return int(self.features.shape[0])


class ArchAdapter(Protocol):
    """What `CompressedVLM` needs to know about one model family."""

    model: Any
    """The unwrapped HF model."""

    def token_id(self, modality: str) -> int:
        """The placeholder token id of `modality` in `input_ids`."""
        ...

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Visual items per modality, each list in placeholder (row-major reading) order."""
        ...

    def encoder_outputs(self, kept: Mapping[str, list[torch.Tensor]]) -> dict[str, Any]:
        """`mm_encoder_outputs` for forward()/generate() from kept (K_i, D) features per item."""
        ...

    def rope_positions(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """(3, B, L) M-RoPE positions of the FULL (uncompressed) sequence, or None for 1-D RoPE."""
        ...

    def text_kwargs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token model inputs for compressed `input_ids` (Qwen's mm_token_type_ids)."""
        ...


def _pooled(features: Any) -> BaseModelOutputWithPooling:
    # HF's own get_*_features put a tuple/list of per-item tensors here, despite the annotation.
    return BaseModelOutputWithPooling(pooler_output=features)


def _require(inputs: Mapping[str, Any], key: str, why: str) -> Any:
    value = inputs.get(key)
    if value is None:
        raise ConfigError(f"input `{key}` is required {why}")
    return value


class LlavaOnevisionAdapter:
    """LlavaOnevisionForConditionalGeneration: a video is F frames of ceil(g/2)^2 bilinear-pooled
    tokens plus one trailing newline; an image (anyres, with row newlines) is one frame."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self._ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self._pooled = math.ceil(g / 2)

    def token_id(self, modality: str) -> int:
        """Placeholder id of `modality`."""
        return int(self._ids[modality])

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Run the vision tower + projector (+ pooling for video)."""
        items: dict[str, list[VisualItem]] = {"image": [], "video": []}
        base = self.model.model
        if inputs.get("pixel_values") is not None:
            sizes = _require(inputs, "image_sizes", "with `pixel_values` for LLaVA-OneVision")
            out = base.get_image_features(
                inputs["pixel_values"], sizes, batch_num_images=inputs.get("batch_num_images"),
                vision_aspect_ratio=inputs.get("vision_aspect_ratio"), return_dict=True,
            )
            for feats in out.pooler_output:  # each (N_i, D)
                items["image"].append(VisualItem("image", feats, 1, int(feats.shape[0]), None))
        if inputs.get("pixel_values_videos") is not None:
            pv = inputs["pixel_values_videos"]  # (B_v, F, 3, H, W)
            out = base.get_video_features(pv, return_dict=True)
            m = self._pooled * self._pooled
            for feats in out.pooler_output:  # (F*M + 1, D)
                items["video"].append(VisualItem("video", feats, int(pv.shape[1]), m,
                                                 (self._pooled, self._pooled), extra=1))
        return items

    def encoder_outputs(self, kept: Mapping[str, list[torch.Tensor]]) -> dict[str, Any]:
        """Images as a list of (K_i, D); videos as one (1, sum K_i, D) tensor (the model
        flattens the first two dims of the video output)."""
        out: dict[str, Any] = {}
        if kept.get("image"):
            out["image"] = _pooled(list(kept["image"]))
        if kept.get("video"):
            out["video"] = BaseModelOutputWithPooling(
                pooler_output=torch.cat(kept["video"], 0)[None]  # (1, sum K_i, D)
            )
        return out

    def rope_positions(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """1-D RoPE: positions follow the compressed sequence, as in the official LLaVA hook."""
        return None

    def text_kwargs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """None needed."""
        return {}


class QwenVLAdapter:
    """Qwen2-VL / Qwen2.5-VL: a (t, h, w) patch grid becomes t frames of (h/2)*(w/2) merged
    tokens. M-RoPE positions are computed on the full grid; compression then drops columns."""

    def __init__(self, model: Any) -> None:
        self.model = model
        cfg = model.config
        self._ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        self._merge = cfg.vision_config.spatial_merge_size

    def token_id(self, modality: str) -> int:
        """Placeholder id of `modality`."""
        return int(self._ids[modality])

    def _items(self, modality: str, pooled: tuple[torch.Tensor, ...], grids: torch.Tensor
               ) -> list[VisualItem]:
        items = []
        for feats, (t, h, w) in zip(pooled, grids.tolist(), strict=True):
            gh, gw = h // self._merge, w // self._merge
            items.append(VisualItem(modality, feats, t, gh * gw, (gh, gw), grid_thw=(t, h, w)))
        return items

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Run the vision tower + merger."""
        items: dict[str, list[VisualItem]] = {"image": [], "video": []}
        base = self.model.model
        if inputs.get("pixel_values") is not None:
            grids = _require(inputs, "image_grid_thw", "with `pixel_values` for Qwen-VL")
            out = base.get_image_features(inputs["pixel_values"], grids, return_dict=True)
            items["image"] = self._items("image", out.pooler_output, grids)
        if inputs.get("pixel_values_videos") is not None:
            grids = _require(inputs, "video_grid_thw", "with `pixel_values_videos` for Qwen-VL")
            out = base.get_video_features(inputs["pixel_values_videos"], grids, return_dict=True)
            items["video"] = self._items("video", out.pooler_output, grids)
        return items

    def encoder_outputs(self, kept: Mapping[str, list[torch.Tensor]]) -> dict[str, Any]:
        """Both modalities as lists of (K_i, D)."""
        return {m: _pooled(list(kept[m])) for m in MODALITIES if kept.get(m)}

    def text_kwargs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """mm_token_type_ids: 0 text, 1 image, 2 video."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self._ids["image"]] = 1
        types[input_ids == self._ids["video"]] = 2
        return {"mm_token_type_ids": types}

    def rope_positions(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """(3, B, L) positions from the model's own `get_rope_index` on the full sequence."""
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = self.text_kwargs(input_ids)["mm_token_type_ids"]
        extra = {}
        if inputs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL video timing
            extra["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=attention_mask, **extra,
        )
        return positions  # (3, B, L)


_ADAPTERS: dict[str, Callable[[Any], ArchAdapter]] = {
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
}


def adapter_for(model: Any) -> ArchAdapter:
    """The adapter of an HF VLM (unwrapping a peft model); ConfigError for unsupported types."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = str(getattr(hf.config, "model_type", None))
    try:
        cls = _ADAPTERS[model_type]
    except KeyError:
        raise ConfigError(
            f"model type {model_type!r} is not supported for token compression; "
            f"supported: {sorted(_ADAPTERS)}"
        ) from None
    return cls(hf)
