"""SparseVLM inside a real HF decoder (LLaVA-OneVision / Qwen2-VL), through module hooks only.

No forward function is copied. Forward pre-hooks on the decoder layers swap in the pruned
sequence's attention mask and rotary embeddings; a forward hook on each pruning layer computes
the text raters' attention rows from that layer's own layernorm, q/k projections and RoPE (R
query rows against L keys, never an L x L map, so every layer keeps running fused SDPA), scores
and prunes the visual tokens of the layer's output, appends the recycled tokens and compacts
positions. The KV cache then holds all tokens up to each pruning layer and only the survivors
after it; decoding continues from each layer's own cache length, as in the official code.

Batch > 1: every sample must hold the same number of visual tokens, in one contiguous block
(padding may differ); each sample prunes to the same count, so sequences stay aligned.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from device.compress.sparsevlm import (
    SparseVLMConfig,
    fit_targets,
    frame_keep,
    keep_top,
    pruning_layers,
    recycle,
    select_raters,
    stage_keep,
)
from device.compress.vidcom2 import vidcom2_scores
from shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageRecord:
    """What one pruning layer did during a prefill."""

    layer: int
    """Decoder layer whose output was pruned."""
    visual_before: int
    """Visual tokens entering the layer."""
    keep: torch.Tensor
    """(B, k) int64 ascending indices into the visual tokens entering the layer."""
    scores: torch.Tensor | None
    """(B, visual_before) significance of those tokens; None when the stage's target kept
    every token, so nothing was scored."""
    recycled: torch.Tensor | None
    """(B, c, D) merged tokens appended after the kept ones, or None."""

    @property
    def visual_after(self) -> int:
        """Visual tokens after this layer (kept + recycled)."""
        c = 0 if self.recycled is None else int(self.recycled.shape[1])
        return int(self.keep.shape[1]) + c


@dataclass(slots=True)
class PrefillTrace:
    """The last prefill's decisions (for tests, benchmarks and upload sampling)."""

    visual_start: torch.Tensor
    """(B,) index of each sample's first visual token in the input sequence."""
    visual_count: int
    """V: visual tokens per sample entering the LLM."""
    raters: list[torch.Tensor]
    """Per sample, (R_b,) indices of the raters relative to the end of the visual block."""
    depth: int
    """Decoder layers."""
    stages: list[StageRecord] = field(default_factory=list)
    origin: torch.Tensor | None = None
    """(B, V_final) original visual index of each visual token left after the last stage
    (-1 for merged tokens)."""

    @property
    def equivalent_tokens(self) -> float:
        """Mean over all decoder layers of the visual tokens after each (official accounting)."""
        total, cur, prev = 0, self.visual_count, 0
        for s in self.stages:
            total += cur * (s.layer - prev)
            cur, prev = s.visual_after, s.layer
        return (total + cur * (self.depth - prev)) / self.depth


@dataclass(slots=True)
class _Group:
    """Layers after one pruning layer, which share a sequence (and cache) length."""

    first_layer: int
    removed: int
    """Tokens removed before this group, relative to the input sequence."""
    mask2d: torch.Tensor
    """(B, L_group) padding mask of the group's prefill sequence."""
    src: torch.Tensor
    """(B, L_group) index of each token's rotary position in the input sequence."""


@dataclass(slots=True)
class _Run:
    """Per-forward state of one prefill, and the decode steps that follow it."""

    trace: PrefillTrace
    targets: tuple[int, ...]
    cache: Cache | None
    length0: int
    """L0: input sequence length."""
    v0: torch.Tensor
    """(B,) visual start in the current sequence."""
    vc: int
    """Current visual tokens per sample."""
    mask2d: torch.Tensor
    """(B, L_cur) padding mask of the current sequence."""
    src: torch.Tensor
    """(B, L_cur) rotary source index (into the input sequence) of each current token."""
    origin: torch.Tensor
    """(B, vc) original visual index of each current visual token (-1 merged)."""
    raters: torch.Tensor
    """(B, R) rater indices relative to the visual block's end (padded with 0)."""
    rater_valid: torch.Tensor
    """(B, R) which rater slots are real."""
    frame_ids: torch.Tensor | None = None
    """(B, vc) frame of each current visual token (-1: none) when budgets are per frame."""
    frame_weights: torch.Tensor | None = None
    """(B, F) VidCom2 per-frame retention ratios (the per-frame budget planner)."""
    groups: list[_Group] = field(default_factory=list)
    override: dict[str, Any] | None = None
    """Layer kwargs replacing the model's for the current group (None in group 0)."""
    decoding: bool = False
    full_positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    """(cos, sin, position_ids) of the input sequence, captured at the first pruning layer."""


class SparseVLMPruner:
    """SparseVLM for an HF VLM's decoder; attach with `with SparseVLMPruner(cfg).attach(model):`.

    Supported: LlavaOnevisionForConditionalGeneration (Qwen2 LLM, official 1-D position
    compaction) and Qwen2VLForConditionalGeneration (M-RoPE: kept tokens keep their positions,
    merged tokens take the position of the visual block's last token). The decoder must use a
    DynamicCache (the default) and a full-attention (non-sliding) layout.
    """

    def __init__(self, cfg: SparseVLMConfig) -> None:
        self.cfg = cfg
        self.trace: PrefillTrace | None = None
        """Decisions of the most recent prefill that had visual tokens."""
        self._handles: list[Any] = []
        self._run: _Run | None = None
        self._call: dict[str, Any] = {}

    # -- attaching ---------------------------------------------------------------------------
    def attach(self, model: Any) -> SparseVLMPruner:
        """Register the hooks on `model` (an HF VLM or a peft wrapper of one); returns self."""
        if self._handles:
            raise ConfigError("this SparseVLMPruner is already attached; detach it first")
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(getattr(hf, "model", None), "language_model", None)
        if decoder is None or not hasattr(decoder, "layers"):
            raise ConfigError(
                f"model {type(hf).__name__} has no `model.language_model.layers` decoder; "
                "SparseVLM supports LLaVA-OneVision and Qwen2-VL"
            )
        tcfg = decoder.config
        if getattr(tcfg, "sliding_window", None) and getattr(tcfg, "use_sliding_window", False):
            raise ConfigError("SparseVLM needs full attention; `use_sliding_window` is set")
        # HF modules are duck-typed here (their attribute types are not visible to mypy)
        self._hf: Any = hf
        self._decoder: Any = decoder
        self._tcfg: Any = tcfg
        self._visual_ids = [
            int(i) for i in (getattr(hf.config, "image_token_id", None),
                             getattr(hf.config, "video_token_id", None)) if i is not None
        ]
        self._video_id = getattr(hf.config, "video_token_id", None)
        self._mrope = getattr(tcfg, "rope_parameters", None) is not None and (
            "mrope_section" in (tcfg.rope_parameters or {})
        )
        depth = len(decoder.layers)
        self._depth = depth
        self._layers = pruning_layers(depth, self.cfg.layer_fractions)
        if self.cfg.keep_counts is not None and len(self._layers) != len(self.cfg.keep_counts):
            raise ConfigError(
                f"`layer_fractions` {self.cfg.layer_fractions} map to layers {self._layers} of "
                f"a {depth}-layer decoder; `keep_counts` needs one entry per layer, got "
                f"{self.cfg.keep_counts}"
            )
        self._handles.append(hf.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for i, layer in enumerate(decoder.layers):
            self._handles.append(layer.register_forward_pre_hook(
                self._pre_layer_hook(i), with_kwargs=True))
        for i in self._layers:
            self._handles.append(decoder.layers[i].register_forward_hook(
                self._prune_hook(i), with_kwargs=True))
        if not self._layers:
            log.warning("SparseVLM: a %d-layer decoder has no layer to prune after; the "
                        "model runs unpruned", depth)
        log.info("SparseVLM attached: pruning after layers %s of %d", self._layers, depth)
        return self

    def detach(self) -> None:
        """Remove every hook; the model is stock again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._run = None

    def __enter__(self) -> SparseVLMPruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def layers(self) -> tuple[int, ...]:
        """Decoder layers whose outputs are pruned (after `attach`)."""
        return self._layers

    def targets_for(self, visual: int) -> tuple[int, ...]:
        """Keep target k_i per pruning layer for V = `visual` tokens."""
        if self.cfg.keep_counts is not None:
            return self.cfg.keep_counts
        cfg = self.cfg
        return fit_targets(visual, self._depth, self._layers, cfg.keep_ratio, cfg.recycle,
                           cfg.recycle_ratio, cfg.cluster_ratio)

    # -- hooks -------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._call = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                      "video_grid_thw": kwargs.get("video_grid_thw"),
                      "position_ids": kwargs.get("position_ids")}

    def _pre_layer_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if index == 0:
                self._start(args[0] if args else kwargs["hidden_states"], kwargs)
            run = self._run
            if run is None:
                return None
            if run.decoding:
                group = self._group_of(run, index)
                if group is None:
                    return None
                if run.override is None or run.override["group"] is not group:
                    run.override = self._decode_override(run, group, args, kwargs)
            if run.override is None:
                return None
            kwargs = dict(kwargs)
            for key in ("attention_mask", "position_embeddings", "position_ids"):
                if key in run.override:
                    kwargs[key] = run.override[key]
            return args, kwargs

        return hook

    def _prune_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            run = self._run
            if run is None or run.decoding:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            y_new = self._prune(run, index, module, x, y, kwargs)
            return (y_new, *output[1:]) if isinstance(output, tuple) else y_new

        return hook

    # -- prefill -----------------------------------------------------------------------------
    def _start(self, x: torch.Tensor, kwargs: dict) -> None:
        """Layer 0 of a forward: begin a prefill run, continue a decode, or stand aside."""
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ConfigError(f"SparseVLM needs a DynamicCache, got {type(cache).__name__}")
        seen = cache.get_seq_length(0) if cache is not None else 0
        run = self._run
        if seen > 0:
            if run is not None and run.cache is cache and run.groups:
                run.decoding, run.override = True, None
            else:
                self._run = None
            return
        self._run = self._begin(x, cache)

    def _begin(self, x: torch.Tensor, cache: Cache | None) -> _Run | None:
        if not self._layers:
            return None
        ids = self._call.get("input_ids")
        if ids is None or ids.shape != x.shape[:2]:
            # visual tokens are found by their placeholder ids; embeddings alone do not say
            log.warning("SparseVLM: this forward has no matching `input_ids`; not pruning")
            return None
        b, length = ids.shape
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for tid in self._visual_ids:
            visual |= ids == tid
        counts = visual.sum(1)  # (B,)
        if int(counts.max()) == 0:
            return None
        v = int(counts[0])
        if bool((counts != v).any()):
            raise ConfigError(
                f"SparseVLM needs the same number of visual tokens in every sample, got "
                f"{counts.tolist()}"
            )
        v0 = visual.int().argmax(1)  # (B,) first visual token
        block = v0[:, None] + torch.arange(v, device=ids.device)  # (B, V)
        if block.max() >= length or not bool(visual.gather(1, block.clamp(max=length - 1)).all()):
            raise ConfigError("SparseVLM needs each sample's visual tokens in one contiguous block")
        am = self._call.get("attention_mask")
        mask2d = (torch.ones_like(ids, dtype=torch.bool) if am is None
                  else am.to(device=ids.device, dtype=torch.bool))
        raters: list[torch.Tensor] = []
        for s in range(b):
            start = int(v0[s]) + v
            n_text = int(mask2d[s, start:].sum())
            if n_text == 0:
                raise ConfigError("SparseVLM needs at least one text token after the visual block")
            r = select_raters(x[s, int(v0[s]) : start].float(),
                              x[s, start : start + n_text].float())
            if r.numel() == 0:  # every text token equally relevant: all of them rate
                r = torch.arange(n_text, device=x.device)
            raters.append(r)
        width = max(int(r.numel()) for r in raters)
        rows = torch.zeros(b, width, dtype=torch.long, device=x.device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=x.device)
        for s, r in enumerate(raters):
            rows[s, : r.numel()] = r
            valid[s, : r.numel()] = True
        trace = PrefillTrace(v0.clone(), v, raters, self._depth)
        self.trace = trace
        frame_ids = frame_weights = None
        if self.cfg.frame_budgets == "vidcom2" and bool((ids.gather(1, v0[:, None]) ==
                                                         self._video_id).all()):
            frames, per_frame = self._frame_layout(v, int(v0[0]))
            fid = torch.arange(v, device=ids.device) // per_frame  # (V,)
            fid[frames * per_frame:] = -1  # LLaVA-OV's trailing newline belongs to no frame
            frame_ids = fid.expand(b, v)
            frame_weights = torch.stack([
                vidcom2_scores(x[s, int(v0[s]) : int(v0[s]) + frames * per_frame].float(),
                               per_frame, self.cfg.keep_ratio, self.cfg.frame_temperature).scales
                for s in range(b)
            ])  # (B, F)
        return _Run(
            trace=trace, targets=self.targets_for(v), cache=cache, length0=length, v0=v0, vc=v,
            mask2d=mask2d, src=torch.arange(length, device=ids.device).expand(b, length),
            origin=torch.arange(v, device=ids.device).expand(b, v), raters=rows,
            rater_valid=valid, frame_ids=frame_ids, frame_weights=frame_weights,
        )

    def _frame_layout(self, v: int, v0: int) -> tuple[int, int]:
        """(frames, tokens per frame) of a video block of `v` tokens."""
        vcfg = self._hf.config.vision_config
        if self._hf.config.model_type == "llava_onevision":
            g = vcfg.image_size // vcfg.patch_size
            per_frame = math.ceil(g / 2) ** 2  # bilinear 2x pooling per frame
            return v // per_frame, per_frame
        grid = self._call.get("video_grid_thw")
        pos = self._call.get("position_ids")
        if grid is not None and grid.shape[0] >= 1:
            t, h, w = (int(n) for n in grid[0])
            frames, per_frame = t, h * w // vcfg.spatial_merge_size**2
        elif pos is not None and pos.dim() == 3:
            # generate() hands the encoder outputs, not the grid, to forward(); the M-RoPE
            # temporal index tells the frames apart (rows are (t, h, w), or (text, t, h, w))
            temporal = pos[pos.shape[0] - 3, 0, v0 : v0 + v]  # (V,)
            frames = int(torch.unique_consecutive(temporal).numel())
            per_frame = v // frames
        else:
            raise ConfigError(
                "per-frame SparseVLM on Qwen-VL video needs `video_grid_thw` or M-RoPE "
                "`position_ids` in the forward call"
            )
        if frames * per_frame != v:
            raise ConfigError(
                f"video layout {frames} x {per_frame} does not cover the block of {v} tokens"
            )
        return frames, per_frame

    def _prune(self, run: _Run, index: int, layer: Any, x: torch.Tensor, y: torch.Tensor,
               kwargs: dict) -> torch.Tensor:
        b, length, _ = y.shape
        stage = self._layers.index(index)
        vc, v0 = run.vc, run.v0
        if stage_keep(run.targets[stage], vc) == vc:  # nothing to prune: skip the scoring
            everything = torch.arange(vc, device=y.device).expand(b, vc)
            run.trace.stages.append(StageRecord(index, vc, everything, None, None))
            run.trace.origin = run.origin
            return y
        rows = v0[:, None] + vc + run.raters  # (B, R) absolute rater rows
        cos, sin = kwargs["position_embeddings"]
        probs = rater_attention(layer, x, rows, run.mask2d, cos, sin)  # (B, H, R, L)
        cols = v0[:, None] + torch.arange(vc, device=y.device)  # (B, Vc)
        per_rater = probs.mean(1).gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))
        w = run.rater_valid.to(per_rater.dtype)[:, :, None]  # (B, R, 1)
        scores = (per_rater * w).sum(1) / w.sum(1)  # (B, Vc)
        k = stage_keep(run.targets[stage], vc)
        if run.frame_ids is None:
            keep = torch.stack([keep_top(scores[s], k) for s in range(b)])  # (B, k)
        else:
            assert run.frame_weights is not None
            keep = torch.stack([frame_keep(scores[s], run.frame_ids[s], run.frame_weights[s], k)
                                for s in range(b)])  # (B, k)
        pruned_mask = torch.ones(b, vc, dtype=torch.bool, device=y.device)
        pruned_mask.scatter_(1, keep, False)
        merged = None
        if self.cfg.recycle and vc > k:
            merged = torch.stack([
                recycle(y[s, cols[s][pruned_mask[s]]], scores[s][pruned_mask[s]],
                        self.cfg.recycle_ratio, self.cfg.cluster_ratio)
                for s in range(b)
            ])  # (B, c, D)
        c = 0 if merged is None else merged.shape[1]
        # Source index of every token of the new sequence in the current one; merged slots
        # point at the block's last visual token (their rotary position in "keep" mode).
        last = (v0 + vc - 1)[:, None].expand(b, c)
        src = torch.cat([
            torch.cat([torch.arange(int(v0[s]), device=y.device), cols[s][keep[s]], last[s],
                       torch.arange(int(v0[s]) + vc, length, device=y.device)])[None]
            for s in range(b)
        ])  # (B, L_new)
        y_new = y.gather(1, src[..., None].expand(-1, -1, y.shape[-1]))  # (B, L_new, D)
        is_merged = torch.zeros_like(src, dtype=torch.bool)
        if merged is not None:
            slots = v0[:, None] + k + torch.arange(c, device=y.device)  # (B, c)
            is_merged.scatter_(1, slots, True)
            y_new = y_new.masked_scatter(is_merged[..., None], merged.to(y_new.dtype))
        run.mask2d = run.mask2d.gather(1, src) | is_merged
        run.src = run.src.gather(1, src)
        origin = run.origin.gather(1, keep)
        run.origin = torch.cat([origin, origin.new_full((b, c), -1)], 1)
        if run.frame_ids is not None:
            kept_frames = run.frame_ids.gather(1, keep)
            run.frame_ids = torch.cat([kept_frames, kept_frames.new_full((b, c), -1)], 1)
        run.vc = k + c
        run.trace.stages.append(StageRecord(index, vc, keep, scores, merged))
        run.trace.origin = run.origin
        new_len = src.shape[1]
        group = _Group(index + 1, run.length0 - new_len, run.mask2d, run.src)
        run.groups.append(group)
        run.override = self._prefill_override(run, y_new, kwargs)
        return y_new

    def _prefill_positions(self, run: _Run) -> dict[str, Any]:
        """Rotary tables (and position_ids) of the current sequence, from the input sequence's."""
        assert run.full_positions is not None  # captured by _prefill_override before this call
        cos, sin, pos = run.full_positions
        src = run.src  # (B, L_cur)
        if self._mrope:  # M-RoPE: every token keeps its own 3-D position
            b = src.shape[0]
            idx = src[..., None].expand(-1, -1, cos.shape[-1])
            out: dict[str, Any] = {"position_embeddings": (
                cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx))}
            if pos is not None:
                out["position_ids"] = pos.expand(b, -1).gather(1, src)
            return out
        n = src.shape[1]  # official compaction: the survivors take positions 0..n-1
        out = {"position_embeddings": (cos[:, :n], sin[:, :n])}
        if pos is not None:
            out["position_ids"] = pos[..., :n]
        return out

    def _prefill_override(self, run: _Run, y_new: torch.Tensor, kwargs: dict) -> dict[str, Any]:
        if run.full_positions is None:  # first stage: kwargs hold the input sequence's tables
            cos, sin = kwargs["position_embeddings"]
            run.full_positions = (cos, sin, kwargs.get("position_ids"))
        out = self._prefill_positions(run)
        out["attention_mask"] = self._mask(y_new, run.mask2d, run.cache, run.groups[-1].first_layer)
        return out

    def _decode_override(self, run: _Run, group: _Group, args: tuple, kwargs: dict
                         ) -> dict[str, Any]:
        x = args[0] if args else kwargs["hidden_states"]
        b, q = x.shape[:2]
        assert run.cache is not None  # decoding implies a cache (see _start)
        seen0 = run.cache.get_seq_length(0) - q  # layer 0 already holds this step's tokens
        tail = seen0 + q - run.length0  # tokens since the prefill, this step's included
        am = self._call.get("attention_mask")
        extra = (torch.ones(b, tail, dtype=torch.bool, device=x.device) if am is None
                 else am[:, am.shape[1] - tail:].to(device=x.device, dtype=torch.bool))
        out: dict[str, Any] = {"group": group}
        if not self._mrope:  # each group continues from its own (compacted) cache length
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.arange(seen0, seen0 + q, device=x.device)[None].expand(b, -1)
            shifted = pos - group.removed  # (B, q)
            out["position_embeddings"] = self._decoder.rotary_emb(x, shifted)
            out["position_ids"] = shifted
        mask2d = torch.cat([group.mask2d, extra], 1)  # (B, L_group + tail)
        out["attention_mask"] = self._mask(x, mask2d, run.cache, group.first_layer)
        return out

    def _mask(self, x: torch.Tensor, mask2d: torch.Tensor, cache: Cache | None, layer: int
              ) -> Any:
        """The mask the model itself would build for this sequence at `layer`."""
        if layer >= self._depth:
            return None
        return create_causal_mask(config=self._tcfg, inputs_embeds=x, attention_mask=mask2d,
                                  past_key_values=cache, position_ids=None, layer_idx=layer)

    @staticmethod
    def _group_of(run: _Run, index: int) -> _Group | None:
        found = None
        for g in run.groups:
            if g.first_layer <= index:
                found = g
        return found


def rater_attention(layer: Any, x: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-softmax causal attention of the query rows `rows` over all keys, from the layer's own
    input layernorm, q/k projections and rotary embedding (the rows of the map the layer's
    attention computes, without the other L - R rows).

    Args:
        layer: an HF decoder layer with `input_layernorm` and `self_attn.{q,k}_proj`.
        x: (B, L, D) the layer's input hidden states.
        rows: (B, R) query positions.
        key_valid: (B, L) False at padding.
        cos, sin: (B or 1, L, head_dim) the rotary tables passed to the layer.

    Returns:
        (B, H, R, L) float32 probabilities (softmax over each row's allowed keys).
    """
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, length, d = x.shape
    hd = attn.head_dim
    h = layer.input_layernorm(x)  # (B, L, D)
    h_rows = h.gather(1, rows[..., None].expand(-1, -1, d))  # (B, R, D)
    q = attn.q_proj(h_rows).view(b, rows.shape[1], -1, hd).transpose(1, 2)  # (B, H, R, hd)
    k = attn.k_proj(h).view(b, length, -1, hd).transpose(1, 2)  # (B, Hkv, L, hd)
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    idx = rows[..., None].expand(-1, -1, hd)
    q, _ = rope(q, q, cos.gather(1, idx), sin.gather(1, idx))
    k, _ = rope(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, L, hd)
    logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, R, L)
    keys = torch.arange(length, device=x.device)
    allowed = (keys[None, None, :] <= rows[..., None]) & key_valid[:, None, :]  # (B, R, L)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)
