"""SparseVLM (Zhang et al., ICML 2025, arXiv:2410.04417): text-guided visual-token sparsification.

Pure tensor core, following the official code (Gumpest/SparseVLMs v1.5 / main `USE_VERSION=1_0`),
not the paper where they differ: raters are the text tokens whose mean softmax relevance to the
visual input embeddings is above average; a visual token's significance is the raters' attention
to it (mean over all heads, then raters); the top-k are kept in their original order; 30% of the
pruned tokens (the highest-scoring) are clustered by density-peak kNN (TCFormer's DPC-kNN with
k = cluster count) into int(n2 / 10) + 1 groups and merged by their mean ("recycling").
Model integration lives in `device/vlm/sparsevlm_hooks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from device.compress.base import KeepPlan, Stage, VisualBatch, check_keep_ratio
from device.compress.vidcom2 import vidcom2_frame_budgets
from shared.errors import ConfigError

OFFICIAL_TABLES: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
"""Official k per pruning layer [2, 6, 15] of LLaVA-1.5-7B (V = 576), keyed by the
"equivalent" retained-token budget (v1.5 / main1_0 `sparse_token_list_*`)."""

FRAME_PLANNERS: tuple[str, ...] = ("none", "vidcom2")
OFFICIAL_VISUAL_TOKENS = 576
OFFICIAL_LAYER_FRACTIONS: tuple[float, ...] = (2 / 32, 6 / 32, 15 / 32)
"""Pruning layers 2, 6, 15 of LLaVA-1.5's 32, as fractions of depth."""


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Visual-relevant text tokens ("raters") chosen from the LLM input embeddings.

    r = mean over visual tokens of softmax_text(Hv @ Ht^T) (raw dot product, no 1/sqrt(D));
    the raters are the text tokens with r strictly above mean(r).

    Args:
        visual: (V, D) visual input embeddings.
        text: (T, D) embeddings of every token after the visual block.

    Returns:
        (R,) int64 ascending indices into `text`. Empty when all r are equal (e.g. T = 1);
        callers then fall back to all text tokens.
    """
    if visual.dim() != 2 or text.dim() != 2 or visual.shape[1] != text.shape[1]:
        raise ConfigError(
            f"`visual` (V, D) and `text` (T, D) must share D, got {tuple(visual.shape)} "
            f"and {tuple(text.shape)}"
        )
    if text.shape[0] == 0 or visual.shape[0] == 0:
        raise ConfigError(f"need V, T >= 1, got V={visual.shape[0]}, T={text.shape[0]}")
    relevance = torch.softmax(visual @ text.T, dim=-1).mean(0)  # (T,)
    return torch.where(relevance > relevance.mean())[0]  # (R,)


def visual_scores(attn_rows: torch.Tensor, visual_start: int, visual_count: int) -> torch.Tensor:
    """Significance of each current visual token: raters' attention, mean over heads then raters.

    Args:
        attn_rows: (H, R, L) post-softmax attention of the R rater queries over all L keys.
        visual_start: index of the first visual token among the L keys.
        visual_count: number of current visual tokens (contiguous from `visual_start`).

    Returns:
        (V,) scores, V = visual_count.
    """
    if attn_rows.dim() != 3:
        raise ConfigError(f"`attn_rows` must be (H, R, L), got {tuple(attn_rows.shape)}")
    if visual_start < 0 or visual_count < 1 or visual_start + visual_count > attn_rows.shape[2]:
        raise ConfigError(
            f"visual block [{visual_start}, {visual_start + visual_count}) must lie in "
            f"[0, {attn_rows.shape[2]}) with visual_count >= 1"
        )
    per_rater = attn_rows.mean(0)[:, visual_start : visual_start + visual_count]  # (R, V)
    return per_rater.mean(0)  # (V,)


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) int64 ascending indices of the k highest `scores` (V,), original order kept."""
    if not 0 <= k <= scores.shape[-1]:
        raise ConfigError(f"`k` must be in [0, {scores.shape[-1]}], got {k}")
    return torch.topk(scores, k).indices.sort().values


def recycle_selection(pruned_scores: torch.Tensor, ratio: float = 0.3) -> torch.Tensor:
    """Which pruned tokens are recycled: the int(ratio * n) + 1 highest-scoring, by score desc.

    Args:
        pruned_scores: (n,) significance of the pruned tokens, n >= 1.
        ratio: the recycled fraction tau (official 0.3).

    Returns:
        (n2,) int64 indices into the pruned tokens, n2 = min(int(ratio * n) + 1, n).
    """
    n = int(pruned_scores.shape[0])
    if n < 1:
        raise ConfigError("`pruned_scores` must hold at least one token")
    n2 = min(int(n * ratio) + 1, n)
    return torch.topk(pruned_scores, n2).indices


def cluster_count(n_selected: int, ratio: float = 0.1) -> int:
    """Number of clusters for `n_selected` recycled tokens: int(ratio * n) + 1 (official theta)."""
    return min(int(n_selected * ratio) + 1, n_selected)


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Density-peak kNN clustering (TCFormer) of `x` (n, D) into `clusters` groups, merged by mean.

    As in the official `cluster_and_merge`: distances d = ||xi - xj|| / sqrt(D); density
    rho = exp(-mean of the squared distances to the k = `clusters` nearest, self included);
    delta = distance to the nearest denser token (max distance for the densest); centres are
    the top `clusters` by rho * delta, in that order; each token joins its nearest centre.
    Density ties are exact whenever kNN sets coincide (with k = 2 every mutual-nearest pair
    ties); the official code breaks them with 1e-6 random noise. Here the later token counts as
    denser: deterministic, and it reproduces the reference vectors' cluster order.

    Returns:
        (clusters, D) merged tokens, cluster j being centre j's group.
    """
    n, d = x.shape
    if not 1 <= clusters <= n:
        raise ConfigError(f"`clusters` must be in [1, {n}], got {clusters}")
    xf = x.float()
    # Direct differences, not the matmul expansion: self-distances must be exactly 0.
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / d**0.5  # (n, n)
    nearest = torch.topk(dist, clusters, dim=-1, largest=False).values  # (n, k)
    density = torch.exp(-(nearest**2).mean(-1))  # (n,)
    idx = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (  # (n, n): j denser than i
        (density[None, :] == density[:, None]) & (idx[None, :] > idx[:, None])
    )
    delta = torch.where(denser, dist, dist.max()).min(-1).values  # (n,)
    centres = torch.topk(delta * density, clusters).indices  # (c,)
    assign = dist[centres].argmin(0)  # (n,) cluster of each token
    assign[centres] = torch.arange(clusters, device=x.device)
    onehot = torch.zeros(clusters, n, dtype=xf.dtype, device=x.device)
    onehot[assign, idx] = 1.0  # (c, n)
    merged = (onehot @ xf) / onehot.sum(-1, keepdim=True)  # (c, D)
    return merged.to(x.dtype)


def recycle(
    pruned_hidden: torch.Tensor,
    pruned_scores: torch.Tensor,
    ratio: float = 0.3,
    cluster_ratio: float = 0.1,
) -> torch.Tensor:
    """SparseVLM token recycling of one sample's pruned visual tokens.

    The int(0.3 n) + 1 highest-scoring pruned tokens are clustered by density-peak kNN into
    c = int(n2 / 10) + 1 groups and merged by mean.

    Args:
        pruned_hidden: (n, D) hidden states (layer output) of the pruned tokens, ascending order.
        pruned_scores: (n,) their significance scores.
        ratio: recycled fraction tau.
        cluster_ratio: clusters per recycled token theta.

    Returns:
        (c, D) merged tokens.
    """
    if pruned_hidden.dim() != 2 or pruned_scores.shape != (pruned_hidden.shape[0],):
        raise ConfigError(
            f"`pruned_hidden` (n, D) and `pruned_scores` (n,) must agree, got "
            f"{tuple(pruned_hidden.shape)} and {tuple(pruned_scores.shape)}"
        )
    chosen = recycle_selection(pruned_scores, ratio)  # (n2,)
    return dpc_knn_merge(pruned_hidden[chosen], cluster_count(chosen.shape[0], cluster_ratio))


def recycled_count(pruned: int, ratio: float = 0.3, cluster_ratio: float = 0.1) -> int:
    """How many merged tokens recycling `pruned` tokens yields (0 when nothing was pruned)."""
    if pruned <= 0:
        return 0
    return cluster_count(min(int(pruned * ratio) + 1, pruned), cluster_ratio)


def stage_keep(target: int, current: int) -> int:
    """Tokens kept at a stage: min(target, current).

    The official code uses min(target, current - 1), which prunes (and recycles) one token even
    when its table asks for more tokens than there are; that only happens for inputs smaller than
    the tables assume (V < 576). Here such a stage keeps everything and changes nothing.
    """
    return max(0, min(target, current))


def stage_counts(
    visual: int,
    targets: tuple[int, ...],
    recycle_tokens: bool = True,
    ratio: float = 0.3,
    cluster_ratio: float = 0.1,
) -> list[tuple[int, int]]:
    """(kept, recycled) per pruning stage for `visual` tokens and per-stage targets k_i.

    k = stage_keep(k_i, V_cur), then V_cur = k + recycled.
    """
    out = []
    cur = visual
    for t in targets:
        k = stage_keep(t, cur)
        c = recycled_count(cur - k, ratio, cluster_ratio) if recycle_tokens else 0
        out.append((k, c))
        cur = k + c
    return out


def equivalent_tokens(visual: int, depth: int, layers: tuple[int, ...], after: list[int]) -> float:
    """Official "equivalent" token count: mean over all layers of the visual count after each.

    Args:
        visual: V entering layer 0.
        depth: number of decoder layers.
        layers: pruning layers, ascending.
        after: visual count after each pruning layer (same length as `layers`).
    """
    total, cur, prev = 0, visual, 0
    for layer, n in zip(layers, after, strict=True):
        total += cur * (layer - prev)  # layers prev .. layer-1 see `cur`
        cur, prev = n, layer
    total += cur * (depth - prev)
    return total / depth


def pruning_layers(depth: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Decoder layers int(f * depth) for each fraction, deduplicated, ascending.

    The last layer is never a pruning layer: its output only feeds the final norm and the LM
    head, so pruning there saves nothing and would only flatter the equivalent-token count
    (this matters for shallow students, e.g. a 2-layer decoder prunes after layer 0 only).
    """
    return tuple(sorted({int(f * depth) for f in fractions} - set(range(depth - 1, depth + 1))))


def fit_targets(
    visual: int,
    depth: int,
    layers: tuple[int, ...],
    keep_ratio: float,
    recycle_tokens: bool = True,
    ratio: float = 0.3,
    cluster_ratio: float = 0.1,
) -> tuple[int, ...]:
    """Per-layer keep targets with the shape of the nearest official table, scaled so that the
    equivalent token count on this model (V tokens, `depth` layers, these pruning layers) is as
    close as possible to keep_ratio * V.

    The official tables are for LLaVA-1.5 (V = 576, 32 layers, layers 2/6/15); the shape of the
    budget nearest to keep_ratio * 576 is reused (its first len(layers) entries, the last one
    repeated if more layers are asked for).
    """
    if keep_ratio >= 1.0:  # everything kept: no stage prunes (and nothing is recycled)
        return (visual,) * len(layers)
    key = min(OFFICIAL_TABLES, key=lambda b: abs(b - keep_ratio * OFFICIAL_VISUAL_TOKENS))
    shape = list(OFFICIAL_TABLES[key])
    shape = (shape + [shape[-1]] * len(layers))[: len(layers)]
    goal = keep_ratio * visual

    def targets(scale: float) -> tuple[int, ...]:
        return tuple(max(1, round(scale * s * visual / OFFICIAL_VISUAL_TOKENS)) for s in shape)

    def equiv(t: tuple[int, ...]) -> float:
        counts = stage_counts(visual, t, recycle_tokens, ratio, cluster_ratio)
        return equivalent_tokens(visual, depth, layers, [k + c for k, c in counts])

    lo, hi = 0.0, OFFICIAL_VISUAL_TOKENS / min(shape)
    for _ in range(40):  # bisection on the scale; equiv() is monotone in it
        mid = (lo + hi) / 2
        if equiv(targets(mid)) < goal:
            lo = mid
        else:
            hi = mid
    return min((targets(lo), targets(hi)), key=lambda t: abs(equiv(t) - goal))


@dataclass(frozen=True, slots=True)
class SparseVLMConfig:
    """Settings of SparseVLM; the defaults are the official v1.5 "192 of 576" setting."""

    keep_ratio: float = 192 / 576
    """Equivalent fraction of visual tokens kept: the mean over all decoder layers of the visual
    tokens present after each layer, divided by V (the official "192 tokens" is 192/576)."""
    layer_fractions: tuple[float, ...] = OFFICIAL_LAYER_FRACTIONS
    """Pruning layers as fractions of the decoder depth (official 2, 6, 15 of 32)."""
    keep_counts: tuple[int, ...] | None = None
    """Explicit k per pruning layer (an official table such as (300, 200, 110)), used as is
    instead of fitting to `keep_ratio`."""
    recycle: bool = True
    """Merge part of the pruned tokens back in (official token recycling)."""
    recycle_ratio: float = 0.3
    """Fraction tau of the pruned tokens (highest-scoring first) that are recycled."""
    cluster_ratio: float = 0.1
    """Clusters per recycled token theta: c = int(theta * n2) + 1."""
    frame_budgets: str = "none"
    """"vidcom2": split every stage's k across a video's frames in proportion to VidCom2's
    per-frame retention ratios (its Frame Compression Adjustment), then rank by SparseVLM
    within each frame. "none": one global top-k (official)."""
    frame_temperature: float = 0.01
    """Softmax temperature of VidCom2's frame budgets (its official value)."""

    def __post_init__(self) -> None:
        check_keep_ratio(self.keep_ratio)
        fr = self.layer_fractions
        if not isinstance(fr, tuple) or not fr or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0
            for f in fr
        ):
            raise ConfigError(
                f"`layer_fractions` must be a non-empty tuple of numbers in [0, 1), got {fr!r}"
            )
        if self.keep_counts is not None and (
            not isinstance(self.keep_counts, tuple)
            or len(self.keep_counts) != len(fr)
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                   for k in self.keep_counts)
        ):
            raise ConfigError(
                f"`keep_counts` must be None or a tuple of {len(fr)} ints >= 1 (one per "
                f"pruning layer), got {self.keep_counts!r}"
            )
        if self.frame_budgets not in FRAME_PLANNERS:
            raise ConfigError(
                f"`frame_budgets` must be one of {FRAME_PLANNERS}, got {self.frame_budgets!r}"
            )
        if isinstance(self.frame_temperature, bool) or not (
            isinstance(self.frame_temperature, (int, float)) and self.frame_temperature > 0
        ):
            raise ConfigError(f"`frame_temperature` must be > 0, got {self.frame_temperature!r}")
        for name in ("recycle_ratio", "cluster_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ConfigError(f"`{name}` must be a number in (0, 1], got {v!r}")


@dataclass(frozen=True, slots=True)
class VidCom2SparseVLMConfig(SparseVLMConfig):
    """"vidcom2+sparsevlm": SparseVLM whose per-frame budgets come from VidCom2."""

    frame_budgets: str = "vidcom2"
    """See `SparseVLMConfig.frame_budgets`; VidCom2's planner by default here."""


class SparseVLMCompressor:
    """One SparseVLM selection step as a TokenCompressor (registry key "sparsevlm").

    Given the raters' head-averaged attention over the visual tokens (`VisualBatch.text_attn`),
    keeps round(keep_ratio * F * N) tokens by significance (or exactly `frame_budgets[t]` per
    frame when a budget planner set them, or VidCom2's per-frame budgets when
    `cfg.frame_budgets == "vidcom2"`, registry key "vidcom2+sparsevlm") and recycles the
    pruned ones from `embeds`. The multi-layer in-decoder schedule is
    `device.vlm.sparsevlm_hooks.SparseVLMPruner`, which takes the same config.
    """

    stage: ClassVar[Stage] = Stage.IN_LLM

    def __init__(self, cfg: SparseVLMConfig) -> None:
        self.cfg = cfg

    def select(self, batch: VisualBatch) -> KeepPlan:
        """Top tokens by rater attention (per frame under budgets), plus recycled tokens."""
        t, m = batch.num_frames, batch.tokens_per_frame
        if batch.text_attn is None or batch.text_attn.dim() != 2 or (
            batch.text_attn.shape[1] != t * m
        ):
            got = None if batch.text_attn is None else tuple(batch.text_attn.shape)
            raise ConfigError(f"`text_attn` must be (Q, {t * m}) for SparseVLM, got {got}")
        scores = batch.text_attn.mean(0)  # (F*N,)
        budgets = batch.frame_budgets
        if budgets is None and self.cfg.frame_budgets == "vidcom2":
            budgets = vidcom2_frame_budgets(batch.embeds.reshape(t * m, -1), m,
                                            self.cfg.keep_ratio, self.cfg.frame_temperature)
        if budgets is not None:
            keep = frame_top(scores.view(t, m), budgets)
            counts = budgets.to(torch.int64)
        else:
            keep = keep_top(scores, max(1, round(self.cfg.keep_ratio * t * m)))
            counts = torch.bincount(keep // m, minlength=t)
        recycled = None
        if self.cfg.recycle and keep.shape[0] < t * m:
            pruned = torch.ones(t * m, dtype=torch.bool)
            pruned[keep] = False
            flat = batch.embeds.reshape(t * m, -1)  # (F*N, D)
            recycled = recycle(flat[pruned], scores[pruned], self.cfg.recycle_ratio,
                               self.cfg.cluster_ratio)
        return KeepPlan(keep=keep, frame_counts=counts, recycled=recycled)


def frame_top(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Global ascending indices of the budgets[t] highest-scoring tokens of each frame.

    Args:
        scores: (F, N) significance per frame and token.
        budgets: (F,) int64 tokens to keep per frame, each in [0, N].
    """
    f, n = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)  # (F, N)
    take = torch.arange(n, device=scores.device).expand(f, n) < budgets.to(scores.device)[:, None]
    mask = torch.zeros(f, n, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order, take)  # (F, N) True where kept
    return mask.view(-1).nonzero().squeeze(1)  # (K,)


def allocate(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split `total` into integer shares proportional to `weights`, each at most its cap.

    Water-filling: shares of capped groups are redistributed to the others; the last units go
    to the largest fractional parts (ties: lower index).

    Args:
        total: units to hand out (clamped to sum(caps)).
        weights: (F,) non-negative weights.
        caps: (F,) int64 maximum share of each group.

    Returns:
        (F,) int64 shares summing to min(total, sum(caps)).
    """
    caps = caps.to(torch.int64)
    w = weights.to(torch.float64).clamp(min=0)
    alloc = torch.zeros_like(caps)
    remaining = min(int(total), int(caps.sum()))
    active = caps > 0
    while remaining > 0:
        wa = torch.where(active, w, torch.zeros_like(w))
        if float(wa.sum()) == 0.0:
            wa = active.to(torch.float64)
        quota = remaining * wa / wa.sum()  # (F,)
        full = active & (quota >= caps)
        if bool(full.any()):  # capped groups take their cap; the rest re-split what is left
            alloc[full] = caps[full]
            remaining -= int(caps[full].sum())
            active &= ~full
            continue
        base = quota.floor().to(torch.int64)
        alloc += base
        remaining -= int(base.sum())
        frac = torch.where(active, quota - quota.floor(), torch.full_like(quota, -1.0))
        alloc[torch.argsort(-frac, stable=True)[:remaining]] += 1
        remaining = 0
    return alloc


def frame_keep(
    scores: torch.Tensor, frame_ids: torch.Tensor, weights: torch.Tensor, k: int
) -> torch.Tensor:
    """SparseVLM top-k under per-frame budgets (the "vidcom2+sparsevlm" selection).

    Tokens outside any frame (frame id -1: a video's newline, recycled tokens) get their
    proportional share of k; the rest of k is split across frames by `weights` (VidCom2's
    per-frame retention ratios), capped at each frame's current count; each group keeps its
    highest-scoring tokens.

    Args:
        scores: (V,) SparseVLM significance of the current visual tokens.
        frame_ids: (V,) int64 frame of each token, -1 for none.
        weights: (F,) per-frame weights.
        k: tokens to keep in total, in [0, V].

    Returns:
        (k,) int64 ascending indices into the V tokens.
    """
    v = int(scores.shape[0])
    if not 0 <= k <= v:
        raise ConfigError(f"`k` must be in [0, {v}], got {k}")
    f = int(weights.shape[0])
    unframed = frame_ids < 0  # (V,)
    counts = torch.bincount(frame_ids[~unframed], minlength=f)  # (F,)
    k_free = min(int(unframed.sum()), round(k * int(unframed.sum()) / max(v, 1)))
    k_free = max(k_free, k - int(counts.sum()))
    shares = allocate(k - k_free, weights, counts)  # (F,)
    groups = torch.where(unframed, torch.full_like(frame_ids, f), frame_ids)  # (V,)
    budget = torch.cat([shares, torch.tensor([k_free])]).to(scores.device)  # (F+1,)
    order = torch.argsort(scores, descending=True, stable=True)  # (V,)
    sorted_groups = groups[order]  # (V,)
    onehot = torch.nn.functional.one_hot(sorted_groups, f + 1)  # (V, F+1)
    rank_sorted = (onehot.cumsum(0) - 1).gather(1, sorted_groups[:, None])[:, 0]  # (V,)
    rank = torch.empty_like(order)
    rank[order] = rank_sorted  # rank of each token inside its group, by descending score
    return torch.where(rank < budget[groups])[0]  # (k,)
