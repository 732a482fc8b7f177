"""Pre-LLM visual-token compression inside stock HF VLMs, without copying any forward function.

Encode the visual inputs with the model's own `get_*_features`, let a TokenCompressor pick the
tokens of every image/video, rebuild `input_ids` with exactly the kept number of placeholders
(re-padded per row, so any batch size works), and hand the kept features to the unmodified
`forward()` / `generate()` through `mm_encoder_outputs`. Qwen's M-RoPE positions are computed on the
full grid and the kept columns taken, so surviving tokens keep their original 3-D positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from device.compress.base import Stage, TokenCompressor, VisualBatch
from device.vlm.archs import MODALITIES, ArchAdapter, VisualItem, adapter_for
from shared.errors import ConfigError

log = logging.getLogger(__name__)

_ENCODER_KEYS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw",
                 "video_grid_thw", "batch_num_images", "vision_aspect_ratio",
                 "second_per_grid_ts", "image_sizes_videos")
"""Inputs consumed by encoding/position building; never forwarded to the LLM call."""


@dataclass(frozen=True, slots=True)
class KeptVisual:
    """What survived of one image or video: what the LLM saw and what the device may upload."""

    sample: int
    """Batch row the item belongs to."""
    modality: str
    """"image" or "video"."""
    keep: torch.Tensor
    """(K,) int64 ascending indices into the item's N tokens (frame-major; extras last)."""
    features: torch.Tensor
    """(K, D) the kept post-projector features, exactly as fed to the LLM."""
    num_tokens: int
    """N, the item's token count before compression."""
    frames: int
    """F."""
    tokens_per_frame: int
    """M."""
    grid_hw: tuple[int, int] | None
    """(H, W) token grid of one frame, when known."""
    grid_thw: tuple[int, int, int] | None
    """Qwen (t, h, w) patch grid."""
    frame_counts: torch.Tensor | None
    """(F,) kept tokens per frame (not counting extras), when the compressor reports them."""


@dataclass(frozen=True, slots=True)
class CompressedInputs:
    """Model inputs with the compressed visual tokens, plus per-item records."""

    input_ids: torch.Tensor
    """(B, L') placeholders reduced to the kept counts, padded on the adapter's side."""
    attention_mask: torch.Tensor
    """(B, L')."""
    position_ids: torch.Tensor | None
    """(3, B, L') M-RoPE positions taken from the full grid (Qwen); (B, L') original 1-D
    positions with `original_positions`; else None (compact 1-D positions)."""
    mm_encoder_outputs: dict[str, Any]
    """Kept features per modality in the layout the model's forward expects."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other per-token inputs (Qwen: mm_token_type_ids)."""
    kept: tuple[KeptVisual, ...] = ()
    """One record per image/video, in batch-row then placeholder order."""
    visual_tokens_in: torch.Tensor | None = None
    """(B,) visual tokens per row before compression."""
    visual_tokens_kept: torch.Tensor | None = None
    """(B,) visual tokens per row that reach the LLM."""

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the stock model's forward() or generate()."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids,
                                  "attention_mask": self.attention_mask,
                                  "mm_encoder_outputs": self.mm_encoder_outputs, **self.extra}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs

    def for_sample(self, sample: int) -> list[KeptVisual]:
        """The records of batch row `sample`."""
        return [k for k in self.kept if k.sample == sample]


@dataclass(frozen=True, slots=True)
class CompressedGeneration:
    """Result of `CompressedVLM.generate`."""

    new_tokens: torch.Tensor
    """(B, T) generated ids only (prompt removed)."""
    inputs: CompressedInputs
    """The compressed prompt and the per-item kept indices/features."""
    output: Any = None
    """What `model.generate` returned (a GenerateOutput with caches/scores when
    `return_dict_in_generate=True`, else the full id tensor)."""


@dataclass(frozen=True, slots=True)
class _ItemKeep:
    keep: torch.Tensor  # (K,) into the item's N tokens
    frame_counts: torch.Tensor | None  # (F,)


class CompressedVLM:
    """A stock HF VLM (or a peft wrapper of one) whose visual tokens pass a PRE_LLM compressor.

    Args:
        model: LlavaOnevision / Qwen2-VL / Qwen2.5-VL ForConditionalGeneration, maybe peft-wrapped.
        compressor: a `Stage.PRE_LLM` TokenCompressor (see `device.compress.COMPRESSORS`).
        padding_side: where rows are padded after compression; "left" suits generate().
        original_positions: 1-D RoPE models (LLaVA-OV) only: give kept tokens the positions
            they had in the full sequence (gaps where tokens were dropped) instead of the
            official compact renumbering. M-RoPE models always keep full-grid positions.
    """

    def __init__(self, model: Any, compressor: TokenCompressor, padding_side: str = "left",
                 original_positions: bool = False):
        if compressor.stage is not Stage.PRE_LLM:
            raise ConfigError(
                f"CompressedVLM applies pre-LLM compressors; {type(compressor).__name__} acts at "
                f"stage {compressor.stage.value!r} (use its own in-LLM integration)"
            )
        if padding_side not in ("left", "right"):
            raise ConfigError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.compressor = compressor
        self.padding_side = padding_side
        self.original_positions = original_positions
        self.adapter: ArchAdapter = adapter_for(model)
        cfg = self.adapter.model.config
        pad = getattr(cfg.get_text_config(), "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def encode(self, inputs: Mapping[str, Any]) -> dict[str, list[VisualItem]]:
        """Vision tower + projector: visual items per modality."""
        return self.adapter.encode(inputs)

    def select(self, items: Mapping[str, list[VisualItem]]) -> dict[str, list[_ItemKeep]]:
        """Run the compressor on every item; the frame tokens are (F, M, D), extras kept."""
        out: dict[str, list[_ItemKeep]] = {}
        for modality, its in items.items():
            out[modality] = []
            for it in its:
                grid = it.frames * it.tokens_per_frame
                embeds = it.features[:grid].view(it.frames, it.tokens_per_frame, -1)  # (F, M, D)
                plan = self.compressor.select(VisualBatch(embeds, grid_hw=it.grid_hw))
                if plan.recycled is not None:
                    raise ConfigError("pre-LLM compression cannot append recycled tokens")
                keep = plan.keep.to(it.features.device)
                if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= grid
                                     or bool((keep[1:] <= keep[:-1]).any())):
                    raise ValueError(f"{type(self.compressor).__name__} returned indices that are "
                                     f"not ascending, unique and in [0, {grid})")
                extras = torch.arange(grid, it.num_tokens, device=keep.device)  # (extra,)
                out[modality].append(_ItemKeep(torch.cat([keep, extras]), plan.frame_counts))
        return out

    def build(self, inputs: Mapping[str, Any], items: Mapping[str, list[VisualItem]],
              keeps: Mapping[str, list[_ItemKeep]]) -> CompressedInputs:
        """Drop the unkept placeholders from `input_ids` and assemble the model inputs."""
        ids = inputs["input_ids"]  # (B, L)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        valid = mask.bool()  # (B, L)
        survive = valid.clone()  # (B, L) tokens that reach the LLM
        n_in = torch.zeros(ids.shape[0], dtype=torch.long)
        n_kept = torch.zeros(ids.shape[0], dtype=torch.long)
        kept: list[KeptVisual] = []
        kept_feats: dict[str, list[torch.Tensor]] = {}
        for modality in MODALITIES:
            its = items.get(modality, [])
            where = ((ids == self.adapter.token_id(modality)) & valid).nonzero()  # (P, 2)
            need = sum(it.num_tokens for it in its)
            if where.shape[0] != need:
                raise ConfigError(f"input_ids hold {where.shape[0]} {modality} placeholders but "
                                  f"the {modality} inputs encode to {need} tokens")
            start = 0
            kept_feats[modality] = []
            for it, ik in zip(its, keeps.get(modality, []), strict=True):
                rows = where[start:start + it.num_tokens]  # (N, 2)
                start += it.num_tokens
                b = int(rows[0, 0])
                if bool((rows[:, 0] != b).any()):
                    raise ConfigError(f"a {modality}'s placeholders span several batch rows")
                drop = torch.ones(it.num_tokens, dtype=torch.bool, device=rows.device)
                drop[ik.keep.to(rows.device)] = False
                survive[b, rows[drop, 1]] = False
                feats = it.features[ik.keep]  # (K, D)
                kept_feats[modality].append(feats)
                n_in[b] += it.num_tokens
                n_kept[b] += int(ik.keep.numel())
                kept.append(KeptVisual(b, modality, ik.keep, feats, it.num_tokens, it.frames,
                                       it.tokens_per_frame, it.grid_hw, it.grid_thw,
                                       ik.frame_counts))
        kept.sort(key=lambda k: k.sample)  # stable: placeholder order inside a row
        full_pos = self.adapter.rope_positions(inputs, ids, mask)  # (3, B, L) or None
        if full_pos is None and self.original_positions:
            full_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[None]  # (1, B, L)
        new_ids, new_mask, new_pos = self._repack(ids, survive, full_pos)
        if new_pos is not None and new_pos.shape[0] == 1:
            new_pos = new_pos[0]  # (B, L') 1-D RoPE positions
        return CompressedInputs(
            input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos,
            mm_encoder_outputs=self.adapter.encoder_outputs(kept_feats),
            extra=self.adapter.text_kwargs(new_ids), kept=tuple(kept),
            visual_tokens_in=n_in, visual_tokens_kept=n_kept,
        )

    def _repack(self, ids: torch.Tensor, survive: torch.Tensor, pos: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lengths = survive.sum(1)  # (B,)
        b, length = ids.shape[0], int(lengths.max())
        new_ids = torch.full((b, length), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((b, length), dtype=torch.long, device=ids.device)
        new_pos = None if pos is None else torch.zeros((pos.shape[0], b, length),
                                                       dtype=pos.dtype, device=pos.device)
        for r in range(b):
            cols = survive[r].nonzero().squeeze(1)  # (L_r,)
            n = int(cols.numel())
            dst = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            new_ids[r, dst] = ids[r, cols]
            new_mask[r, dst] = 1
            if new_pos is not None and pos is not None:
                new_pos[:, r, dst] = pos[:, r, cols.to(pos.device)]
        return new_ids, new_mask, new_pos

    def prepare(self, inputs: Mapping[str, Any]) -> CompressedInputs:
        """encode -> select -> build."""
        items = self.encode(inputs)
        return self.build(inputs, items, self.select(items))

    def forward(self, inputs: Mapping[str, Any], **kwargs: Any) -> tuple[Any, CompressedInputs]:
        """One compressed forward pass; returns the model output and the compressed inputs."""
        ci = self.prepare(inputs)
        return self.model(**ci.model_kwargs(), **_passthrough(inputs), **kwargs), ci

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Any], **generate_kwargs: Any) -> CompressedGeneration:
        """Compressed `generate()`; any batch size (rows are re-padded on the left)."""
        ci = self.prepare(inputs)
        output = self.model.generate(**ci.model_kwargs(), **_passthrough(inputs),
                                     **generate_kwargs)
        seqs = output if isinstance(output, torch.Tensor) else output.sequences
        log.debug("compressed generate: visual tokens %s -> %s",
                  ci.visual_tokens_in.tolist() if ci.visual_tokens_in is not None else None,
                  ci.visual_tokens_kept.tolist() if ci.visual_tokens_kept is not None else None)
        return CompressedGeneration(new_tokens=seqs[:, ci.input_ids.shape[1]:], inputs=ci,
                                    output=output)


def _passthrough(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Caller inputs that are neither rebuilt here nor visual (e.g. labels are NOT supported:
    their length would no longer match)."""
    rebuilt = {"input_ids", "attention_mask", "position_ids", "mm_token_type_ids"}
    skip = rebuilt | set(_ENCODER_KEYS)
    extra = {k: v for k, v in inputs.items() if k not in skip and v is not None}
    if "labels" in extra:
        raise ConfigError("`labels` cannot pass through compression (their length changes)")
    return extra
