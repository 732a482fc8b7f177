"""Staged training of a zoo's teacher and student from random init (CPU, minutes).

Stage A trains the vision tower + projector alone with a linear head on the post-projector,
post-pooling tokens (one token per 16 px cell): per cell the shape class present, the object's
observed colour and centre; per frame the progress-bar time and the observed background colour.
The targets are appearance, not names: naming colours under a camera's shift is the language
model's job, which is what makes a `source`-only student fail on shifted domains.
Stage B freezes tower + projector (standardised, see `standardize_projector`), caches their
tokens and trains the teacher's language model on all domains; stage C copies the same frozen
visual weights into the student and trains its smaller language model on `source` only. Both
go through `forward(mm_encoder_outputs=...)`, the path the cloud uses for tokens uploaded by a
device, with an auxiliary per-token loss (`token_targets`) on the middle layer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from shared.errors import ConfigError
from shared.media import procedural as P
from shared.media.frames import normalize
from shared.models.architectures import (
    as_encoder_outputs,
    encode_visual,
    pixel_keys,
    visual_hash,
    visual_state,
)
from shared.models.processor import VLMProcessor

log = logging.getLogger(__name__)
_N_CLASS = len(P.SHAPE_CLASSES)
# head outputs per token: class logits | object rgb (3) | centre (2) | time (1) | background (3)
_HEAD_OUT = _N_CLASS + 3 + 2 + 1 + 3


PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True, slots=True)
class StageSchedule:
    """One optimisation stage."""

    steps: int
    lr: float
    batch: int
    warmup: int = 20
    precision: str = "fp32"
    """Autocast dtype of the stage's forward passes, "fp32" or "bf16" (`_autocast`): bf16
    matmuls run 2.5x faster on CPUs with AVX512-BF16 or AMX; weights, optimizer state and
    gradients stay fp32."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}")


def _lr_lambda(s: StageSchedule) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        frac = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


@contextmanager
def _training_attention(model: PreTrainedModel, precision: str) -> Iterator[None]:
    """Eager attention while a bf16 stage trains, the model's own afterwards.

    Under bf16 autocast the CPU flash-attention backward of SDPA runs 4x slower than in fp32
    and ate the matmuls' gain; eager attention is a few bf16 matmuls (sequences are ~100
    tokens), so a stage B step is 1.5x faster than fp32 SDPA.
    """
    before = model.config._attn_implementation  # noqa: SLF001 - transformers' own field
    if precision == "bf16":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if precision == "bf16":
            model.set_attn_implementation(before)


def _autocast(precision: str) -> torch.autocast | nullcontext[None]:
    """Forward-pass autocast of a stage: weights, optimizer and gradients stay fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- stage A


def frame_targets(samples: Sequence[P.QASample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame, per-cell appearance targets of stage A.

    Returns:
        frames: uint8 (N, S, S, 3), all frames of all samples in order.
        targets: float32 (N, C, 1 + 3 + 2 + 1 + 3 + 3): class id, object rgb, centre, time,
            background rgb, and masks (has object, is video, 1); C = cells per frame.
    """
    frames_out, targets_out = [], []
    for s in samples:
        fr = s.frames.float() / 255.0  # (F, S, S, 3)
        nf, size = fr.shape[0], fr.shape[1]
        grid = size // P.CELL
        tgt = torch.zeros(nf, grid * grid, 13)
        omap = s.object_map.long()  # (F, S, S)
        scene = omap[:, : size - 3] < 0  # background pixels above the progress bar
        bg = (fr[:, : size - 3] * scene[..., None]).sum((1, 2)) / scene.sum((1, 2)).clamp(
            min=1)[:, None]  # (F, 3)
        tgt[:, :, 6] = torch.linspace(0, 1, nf)[:, None] if nf > 1 else 0.0
        tgt[:, :, 7:10] = bg[:, None, :]
        tgt[:, :, 11] = 1.0 if nf > 1 else 0.0
        tgt[:, :, 12] = 1.0
        k = len(s.objects)
        masks = (omap[None] == torch.arange(k).view(k, 1, 1, 1)).float()  # (K, F, S, S)
        area = masks.sum((2, 3))  # (K, F)
        rgb = torch.einsum("kfhw,fhwc->kfc", masks, fr) / area.clamp(min=1)[..., None]
        centers = torch.from_numpy(np.stack([o.centers for o in s.objects]))  # (K, F, 2)
        cell_xy = (centers // P.CELL).long().clamp(0, grid - 1)
        cell = cell_xy[..., 1] * grid + cell_xy[..., 0]  # (K, F)
        cls = torch.tensor([P.SHAPE_CLASSES.index(o.shape) for o in s.objects],
                           dtype=torch.float).view(k, 1).expand(k, nf)
        kk, tt = (area > 0).nonzero(as_tuple=True)  # visible (object, frame) pairs
        cc = cell[kk, tt]
        tgt[tt, cc, 0] = cls[kk, tt]
        tgt[tt, cc, 1:4] = rgb[kk, tt]
        tgt[tt, cc, 4:6] = centers[kk, tt] / size
        tgt[tt, cc, 10] = 1.0
        frames_out.append(s.frames)
        targets_out.append(tgt)
    return torch.cat(frames_out), torch.cat(targets_out)


def _unit_tokens(model: PreTrainedModel, pixels: torch.Tensor, arch: str) -> torch.Tensor:
    """Post-projector tokens per cell for a batch of frame units.

    pixels: (U, T, 3, S, S) with T = 1 (LLaVA-OV) or 2 (Qwen2-VL temporal pair).
    Returns (U, C, D).
    """
    u, t, _, s, _ = pixels.shape
    if arch == "llava_onevision":
        feats = model.model.get_video_features(pixels, return_dict=True).pooler_output
        return feats[:, :-1]  # (U, C, D): drop the closing newline token
    grid = s // model.config.vision_config.patch_size
    proc_cfg = model.config.vision_config
    p, tp, m = proc_cfg.patch_size, proc_cfg.temporal_patch_size, proc_cfg.spatial_merge_size
    x = pixels.reshape(u, 1, tp, 3, grid // m, m, p, grid // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # Qwen2-VL patch order, per unit
    flat = x.reshape(u * grid * grid, 3 * tp * p * p)
    thw = torch.tensor([[1, grid, grid]] * u, dtype=torch.long)
    feats = model.model.get_video_features(flat, thw, return_dict=True).pooler_output
    return torch.stack(list(feats))  # (U, C, D)


def train_vision(model: PreTrainedModel, processor: VLMProcessor,
                 samples: Sequence[P.QASample], sched: StageSchedule, seed: int,
                 progress: bool = True) -> dict[str, float]:
    """Stage A: train tower + projector with the appearance head; returns final loss parts."""
    precision = sched.precision
    arch = processor.config.architecture
    frames, targets = frame_targets(samples)  # (N, S, S, 3), (N, C, 13)
    unit = 2 if arch == "qwen2_vl" else 1
    n_units = frames.shape[0] // unit
    frames = frames[: n_units * unit].reshape(n_units, unit, *frames.shape[1:])
    targets = targets[: n_units * unit].reshape(n_units, unit, *targets.shape[1:])
    dim = model.config.text_config.hidden_size
    head = nn.Linear(dim, _HEAD_OUT)
    params = [p for k, p in model.named_parameters()
              if k.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                               "model.visual."))]
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=sched.lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(sched))
    # rare classes (the flash cross is in 1/4 of the frames, one cell of 9) get up-weighted by
    # 1/sqrt(frequency): unweighted, the cross was never predicted after stage A
    freq = torch.bincount(targets[..., 0].long().flatten(), minlength=_N_CLASS).float()
    cls_weight = (freq.sum() / freq.clamp(min=1)).sqrt()
    cls_weight = cls_weight / cls_weight.mean()  # (K,)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    cfg = processor.config
    parts: dict[str, float] = {}
    bar = tqdm(range(sched.steps), desc="stage A vision", disable=not progress, leave=False)
    with _training_attention(model, precision):
        for _ in bar:
            idx = torch.randint(0, n_units, (sched.batch,), generator=gen)
            fr = frames[idx]  # (U, T, S, S, 3)
            px = normalize(fr.flatten(0, 1), cfg.image_mean, cfg.image_std)  # (U*T, 3, S, S)
            px = px.view(fr.shape[0], unit, *px.shape[1:])  # (U, T, 3, S, S)
            tgt = targets[idx]  # (U, T, C, 13)
            # a temporal pair's token sees both frames: class from the frame with the object
            # (the later one wins ties), regression targets averaged over the pair
            cls = tgt[..., 0].long().amax(1)  # (U, C)
            has = tgt[..., 10].amax(1)  # (U, C)
            reg = tgt[..., 1:10].mean(1)  # (U, C, 9)
            is_video = tgt[..., 11].amax(1)
            with _autocast(precision):
                out = head(_unit_tokens(model, px, arch)).float()  # (U, C, H)
            l_cls = F.cross_entropy(out[..., :_N_CLASS].flatten(0, 1), cls.flatten(),
                                    weight=cls_weight)
            mse = (out[..., _N_CLASS:] - reg) ** 2  # (U, C, 9)
            l_obj = (mse[..., 0:5].mean(-1) * has).sum() / has.sum().clamp(min=1)
            l_time = (mse[..., 5] * is_video).sum() / is_video.sum().clamp(min=1)
            l_bg = mse[..., 6:9].mean()
            loss = l_cls + 10 * l_obj + 3 * l_time + 10 * l_bg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            parts = {"cls": l_cls.item(), "obj": l_obj.item(), "time": l_time.item(),
                     "bg": l_bg.item()}
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
    model.eval()
    return parts


# ----------------------------------------------------------------------------- stages B, C


@torch.no_grad()
def standardize_projector(model: PreTrainedModel, processor: VLMProcessor,
                          samples: Sequence[P.QASample], max_samples: int = 256) -> None:
    """Fold per-dimension standardisation of the visual tokens into the projector's last Linear.

    After stage A the tokens share a large common component (norm ~17 against ~1 for word
    embeddings) and a language model trained on them plateaus at chance; standardised tokens
    (zero mean, unit variance per dimension over training tokens) train in a few hundred steps.
    Pooling is an average, so the affine fold gives exactly standardised pooled tokens.
    """
    videos = [s for s in samples if s.media_kind == "video"][:max_samples]
    feats = cache_visual_tokens(model, processor, videos, progress=False)
    if processor.config.architecture == "llava_onevision":
        feats = [f[:-1] for f in feats]  # the closing newline is its own parameter
        last = model.model.multi_modal_projector.linear_2
    else:
        last = model.model.visual.merger.mlp[2]
    tokens = torch.cat(feats)  # (N, D)
    mu, sd = tokens.mean(0), tokens.std(0).clamp(min=1e-4)  # (D,)
    last.weight.div_(sd[:, None])
    last.bias.sub_(mu).div_(sd)




@torch.no_grad()
def cache_visual_tokens(model: PreTrainedModel, processor: VLMProcessor,
                        samples: Sequence[P.QASample], batch_size: int = 64,
                        progress: bool = True) -> list[torch.Tensor]:
    """Frozen post-projector tokens (N_i, D) for every sample, in order."""
    out: list[torch.Tensor | None] = [None] * len(samples)
    model.eval()
    for kind in ("video", "image"):
        idx = [i for i, s in enumerate(samples) if s.media_kind == kind]
        for start in tqdm(range(0, len(idx), batch_size), desc=f"cache {kind} tokens",
                          disable=not progress, leave=False):
            chunk = idx[start:start + batch_size]
            feats = encode_visual(model, pixel_keys(processor([samples[i] for i in chunk])))
            for i, f in zip(chunk, feats[kind], strict=True):
                out[i] = f.clone()
    return out  # type: ignore[return-value]


# per visual token: colour name | shape class | relevant to the question | motion direction
AUX_CLASSES: tuple[int, ...] = (len(P.COLOR_NAMES) + 1, _N_CLASS, 2, len(P.DIRECTIONS) + 1)


def _objects_per_cell(s: P.QASample, grid: int) -> torch.Tensor:
    """Index into `s.objects` of the object in each (frame, cell), -1 where empty: (F, C)."""
    nf = s.frames.shape[0]
    out = torch.full((nf, grid * grid), -1, dtype=torch.long)
    for k, o in enumerate(s.objects):
        xy = np.clip((o.centers // P.CELL).astype(np.int64), 0, grid - 1)  # (F, 2)
        for f in np.nonzero(o.visible)[0]:
            out[f, xy[f, 1] * grid + xy[f, 0]] = k
    return out


def _object_labels(s: P.QASample) -> torch.Tensor:
    """Per object: colour name, shape class, relevance to the question, motion: (K, 4)."""
    words = s.question.rstrip("?").split()
    colour = next((w for w in words if w in P.COLORS), None)
    shape = next((w for w in words if w in P.SHAPES), None)
    rows = []
    for o in s.objects:
        moved = o.centers[-1] - o.centers[0]  # (2,) x, y
        if np.abs(moved).max() < 1.0:
            motion = 0
        elif abs(moved[0]) > abs(moved[1]):
            motion = 1 + P.DIRECTIONS.index("right" if moved[0] > 0 else "left")
        else:
            motion = 1 + P.DIRECTIONS.index("down" if moved[1] > 0 else "up")
        if s.qtype == "flash":
            relevant = o.shape == P.FLASH_SHAPE
        elif s.qtype == "direction":
            relevant = motion > 0
        else:
            relevant = ((colour is None or o.color == colour)
                        and (shape is None or o.shape == shape) and o.shape != P.FLASH_SHAPE)
        rows.append([1 + P.COLOR_NAMES.index(o.color), P.SHAPE_CLASSES.index(o.shape),
                     int(relevant), motion])
    return torch.tensor(rows, dtype=torch.long).view(-1, 4)


def token_targets(s: P.QASample, processor: VLMProcessor) -> torch.Tensor | None:
    """Auxiliary targets of stages B/C for each visual token of `s`: (N, 4), -100 = none.

    Columns follow `AUX_CLASSES`. They name what the language model must read out of a token
    before it can answer (which object is there, whether the question is about it, how it
    moves); the answer loss alone teaches that through one token per sample and left count,
    exists and direction near chance. None where the token grid is not one token per cell.
    """
    cfg = processor.config
    size = s.frames.shape[1]
    grid, g = size // P.CELL, cfg.image_size // cfg.patch_size
    if size != cfg.image_size or g != 2 * grid:
        return None
    obj = _objects_per_cell(s, grid)  # (F, C)
    # row 0 is "nothing here" (class 0 in every column): empty cells (-1) index it
    labels = torch.cat([torch.zeros(1, 4, dtype=torch.long), _object_labels(s)])
    per_cell = labels[obj + 1]  # (F, C, 4)
    none = torch.full((1, 4), -100, dtype=torch.long)
    if cfg.architecture == "qwen2_vl":
        if s.media_kind == "video":  # one token per temporal pair: the later frame
            return per_cell[1::2].flatten(0, 1)
        return per_cell[0]
    if s.media_kind == "video":  # frames x cells, then the closing newline
        return torch.cat([per_cell.flatten(0, 1), none])
    rows = torch.arange(g) // 2
    patch = per_cell[0].view(grid, grid, 4)[rows][:, rows]  # (g, g, 4): a cell per 2 x 2 patches
    crop = torch.cat([patch, none.expand(g, 1, 4)], 1)  # (g, g + 1, 4)
    return torch.cat([patch.flatten(0, 1), crop.flatten(0, 1)])  # base grid, crop rows + newline


def _drop_keep(n: int, aux: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of the visual tokens one training sample keeps: (K,).

    A keep share uniform in [0.1, 0.6] (a device serves 25-50% and uploads 10-25% of its
    tokens). Half the draws are uniform; the other half favour tokens that show an object
    (aux colour column > 0), as VidCom2 and UTS do by keeping distinctive tokens.
    """
    k = max(1, round(n * (0.1 + 0.5 * float(torch.rand((), generator=gen)))))
    weight = torch.ones(n)
    if aux is not None and float(torch.rand((), generator=gen)) < 0.5:
        weight = torch.where(aux[:, 0] > 0, 8.0, 1.0)
    return torch.multinomial(weight, k, replacement=False, generator=gen).sort().values


def _drop_tokens(text: dict[str, torch.Tensor], placeholder: int,
                 keeps: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Remove each row's dropped visual placeholders; the rest keep their full-prompt positions.

    text: left-padded `text_inputs` output; keeps[i]: (K_i,) indices into row i's placeholders.
    Returns ids, mask, labels and `position_ids` (B, L'), left-padded again. Positions count
    from the first real token (what `generate` derives from the mask) with gaps where tokens
    were dropped: the device's `original_positions` layout.
    """
    ids, mask, labels = text["input_ids"], text["attention_mask"], text["labels"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    rows = []
    for r, keep in enumerate(keeps):
        survive = mask[r].bool()
        vis = (ids[r] == placeholder).nonzero().squeeze(1)  # (N,)
        dropped = torch.ones(vis.numel(), dtype=torch.bool)
        dropped[keep] = False
        survive[vis[dropped]] = False
        rows.append(survive.nonzero().squeeze(1))
    length = max(c.numel() for c in rows)
    out = {"input_ids": torch.full((len(rows), length), pad_id, dtype=ids.dtype),
           "attention_mask": torch.zeros(len(rows), length, dtype=mask.dtype),
           "labels": torch.full((len(rows), length), -100, dtype=labels.dtype),
           "position_ids": torch.zeros(len(rows), length, dtype=torch.long)}
    for r, cols in enumerate(rows):
        dst = slice(length - cols.numel(), length)
        out["input_ids"][r, dst] = ids[r, cols]
        out["attention_mask"][r, dst] = 1
        out["labels"][r, dst] = labels[r, cols]
        out["position_ids"][r, dst] = pos[r, cols]
    return out


def train_language(model: PreTrainedModel, processor: VLMProcessor,
                   samples: Sequence[P.QASample], tokens: Sequence[torch.Tensor],
                   sched: StageSchedule, seed: int, desc: str,
                   progress: bool = True, aux_weight: float = 0.0,
                   token_drop: float = 0.0) -> float:
    """Stages B/C: train the language model on cached visual tokens; returns the final loss
    (EMA, answer loss plus the weighted auxiliary loss).

    The tower and projector stay frozen (their standardised tokens are what a device uploads),
    so a step costs only the language model. Each step draws one media kind (by its share of
    `samples`) and a batch of that kind. With `aux_weight` > 0 a linear head on the middle
    layer's hidden states at the visual tokens also learns `token_targets` (discarded after).
    With `token_drop` > 0 (LLaVA-OV only) that share of batches keeps a random subset of each
    sample's visual tokens at their full-prompt positions (`_drop_tokens`), and every batch
    passes explicit mask-derived positions, so the model answers from what a compressor keeps
    or a device uploads.
    """
    precision = sched.precision
    if token_drop > 0 and processor.config.architecture != "llava_onevision":
        raise ValueError("token_drop needs 1-D RoPE positions (llava_onevision), got "
                         f"{processor.config.architecture!r}")
    pools: dict[str, list[int]] = {"video": [], "image": []}
    for i, s in enumerate(samples):
        pools[s.media_kind].append(i)
    kinds = [k for k, v in pools.items() if v]
    weights = torch.tensor([len(pools[k]) for k in kinds], dtype=torch.float)
    prefixes = ("model.language_model.", "lm_head.")
    params = [p for k, p in model.named_parameters() if k.startswith(prefixes)]
    for k, p in model.named_parameters():
        p.requires_grad_(k.startswith(prefixes))
    aux = [token_targets(s, processor) for s in samples] if aux_weight > 0 else []
    head = nn.Linear(model.config.text_config.hidden_size, sum(AUX_CLASSES))
    layer = max(1, model.config.text_config.num_hidden_layers // 2)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=sched.lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(sched))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    ema, aux_txt = float("nan"), ""
    bar = tqdm(range(sched.steps), desc=desc, disable=not progress, leave=False)
    with _training_attention(model, precision):
        for _ in bar:
            kind = kinds[int(torch.multinomial(weights, 1, generator=gen))]
            pick = [pools[kind][int(j)]
                    for j in torch.randint(0, len(pools[kind]), (sched.batch,), generator=gen)]
            text, enc, targets = _language_batch(model, processor, samples, tokens, aux, pick,
                                                 kind, token_drop, gen)
            placeholder = processor.placeholder_id(kind)
            use_aux = all(t is not None for t in targets)
            with _autocast(precision):
                out = model(**text, mm_encoder_outputs=enc, output_hidden_states=use_aux)
                loss = out.loss.float()
                if use_aux:
                    h = out.hidden_states[layer][text["input_ids"] == placeholder]  # (sum K, D)
                    parts = _aux_losses(head(h).float(),
                                        torch.cat([t for t in targets if t is not None]))
                    loss = loss + aux_weight * sum(parts) / len(parts)
                    aux_txt = " aux " + " ".join(f"{p.item():.2f}" for p in parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_sched.step()
            ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
            bar.set_postfix_str(f"loss={ema:.3f}{aux_txt}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return ema


def _language_batch(model: PreTrainedModel, processor: VLMProcessor,
                    samples: Sequence[P.QASample], tokens: Sequence[torch.Tensor],
                    aux: Sequence[torch.Tensor | None], pick: Sequence[int], kind: str,
                    token_drop: float, gen: torch.Generator
                    ) -> tuple[dict[str, torch.Tensor], Any, list[torch.Tensor | None]]:
    """Model inputs of one stage B/C batch of `kind` samples `pick`: text inputs, encoder
    outputs and each row's auxiliary targets ((K_i, 4) or None), after the token drop."""
    batch = [samples[i] for i in pick]
    text = processor.text_inputs([s.question for s in batch], [s.answer for s in batch], kind)
    if processor.config.architecture == "qwen2_vl":
        g = processor.config.image_size // processor.config.patch_size
        t = processor.config.num_frames // 2 if kind == "video" else 1
        grid_key = "video_grid_thw" if kind == "video" else "image_grid_thw"
        text[grid_key] = torch.tensor([[t, g, g]] * len(batch), dtype=torch.long)
    feats = [tokens[i] for i in pick]
    targets = [aux[i] if aux else None for i in pick]
    if token_drop > 0:
        placeholder = processor.placeholder_id(kind)
        keeps = [torch.arange(f.shape[0]) for f in feats]
        if float(torch.rand((), generator=gen)) < token_drop:
            keeps = [_drop_keep(f.shape[0], t, gen) for f, t in zip(feats, targets, strict=True)]
        text = _drop_tokens(text, placeholder, keeps, processor.pad_id)
        feats = [f[k] for f, k in zip(feats, keeps, strict=True)]
        targets = [None if t is None else t[k] for t, k in zip(targets, keeps, strict=True)]
    return text, as_encoder_outputs(model, {kind: feats}), targets


def _aux_losses(logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Cross entropy per `AUX_CLASSES` column: logits (M, sum), targets (M, 4)."""
    parts = logits.split(list(AUX_CLASSES), dim=-1)
    return [F.cross_entropy(p, targets[:, j], ignore_index=-100) for j, p in enumerate(parts)]


def copy_visual(src: PreTrainedModel, dst: PreTrainedModel) -> str:
    """Copy the shared vision tower + projector from `src` into `dst`; returns their hash."""
    state = visual_state(src)
    missing = set(state) - set(dst.state_dict())
    if missing:
        raise KeyError(f"student lacks visual parameters {sorted(missing)[:3]}...")
    dst.load_state_dict(state, strict=False)
    h_src, h_dst = visual_hash(src), visual_hash(dst)
    if h_src != h_dst:
        raise RuntimeError("visual weights differ after copy")
    return h_src


class Stopwatch:
    """Named wall-clock durations of the training stages."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._t, 2)
        self._t = now
