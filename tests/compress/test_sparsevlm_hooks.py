"""SparseVLM inside real tiny HF VLMs: against the stock model and a naive step-by-step reference.

The reference runs the stock decoder layers one at a time with EAGER attention (full L x L
probabilities), scores, prunes, recycles and compacts by hand, and continues on the literal
pruned sequence. The pruner runs the same model with SDPA and hooks only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.masking_utils import create_causal_mask

from device.compress.sparsevlm import (
    SparseVLMConfig,
    VidCom2SparseVLMConfig,
    allocate,
    frame_keep,
    keep_top,
    recycle,
    select_raters,
)
from device.compress.vidcom2 import vidcom2_scores
from device.vlm.sparsevlm_hooks import SparseVLMPruner, rater_attention
from shared.errors import ConfigError

VOCAB, IMAGE_ID, VIDEO_ID, VSTART, VEND = 128, 127, 126, 125, 124
IMAGE_TOKENS = 136  # 32 px, patch 4, one anyres tile: 64 base + 64 tile + 8 row newlines


def tiny_llava_ov(layers: int = 8, attn: str = "sdpa") -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=4),
        image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32]],
    )
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LlavaOnevisionForConditionalGeneration:
    return tiny_llava_ov()


@pytest.fixture(scope="module")
def eager(model: LlavaOnevisionForConditionalGeneration) -> LlavaOnevisionForConditionalGeneration:
    ref = tiny_llava_ov(attn="eager")
    ref.load_state_dict(model.state_dict())
    return ref


def image_batch(prefixes: list[int], texts: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded batch: [bos, prefix..., <image>*136, text...] per sample, one image each."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for p, t in zip(prefixes, texts, strict=True):
        seqs.append([1] + torch.randint(3, 100, (p,), generator=g).tolist() + [IMAGE_ID]
                    * IMAGE_TOKENS + torch.randint(3, 100, (t,), generator=g).tolist())
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = torch.tensor(s)
        mask[b, length - len(s):] = 1
    n = len(seqs)
    # generate()'s own convention, passed explicitly so plain forward() uses it too
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                pixel_values=torch.randn(n, 2, 3, 32, 32, generator=g),
                image_sizes=torch.tensor([[32, 32]] * n))


@dataclass
class Reference:
    logits: torch.Tensor  # (B, L_final, vocab)
    scores: list[torch.Tensor]  # per stage (B, V_cur)
    keep: list[torch.Tensor]  # per stage (B, k)
    recycled: list[torch.Tensor | None]  # per stage (B, c, D)


def compact_positions(model, inputs, h, mask2d, src):  # noqa: ANN001, ANN201
    """Official 1-D compaction: the current sequence is numbered afresh (pads excluded)."""
    length = h.shape[1]
    pos = (torch.arange(length)[None] - (~mask2d).sum(1, keepdim=True)).clamp(min=0)
    return model.model.language_model.rotary_emb(h, pos), pos


def kept_mrope_positions(model, inputs, h, mask2d, src):  # noqa: ANN001, ANN201
    """M-RoPE: every token keeps its original 3-D position (merged: the block's last)."""
    pos3, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    full = torch.zeros(h.shape[0], inputs["input_ids"].shape[1], h.shape[2])
    cos, sin = model.model.language_model.rotary_emb(full, pos3)  # (B, L0, hd)
    idx = src[..., None].expand(-1, -1, cos.shape[-1])
    return (cos.gather(1, idx), sin.gather(1, idx)), None


@torch.no_grad()
def naive_reference(eager_model, inputs: dict[str, torch.Tensor], layers: tuple[int, ...],
                    targets: tuple[int, ...], forced: tuple[list, list] | None = None,
                    positions=compact_positions) -> Reference:  # noqa: ANN001
    """SparseVLM by hand with the stock layers; `forced` = (keep, recycled) per stage replays a
    recorded plan instead of selecting (for sequences extended by generated tokens)."""
    dec = eager_model.model.language_model
    out = eager_model(**inputs, output_hidden_states=True)
    h = out.hidden_states[0]  # (B, L, D) LLM input embeddings
    mask2d = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    b = ids.shape[0]
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    n_vis = int(visual[0].sum())
    v0 = [int(visual[s].nonzero()[0]) for s in range(b)]
    src = torch.arange(ids.shape[1]).expand(b, -1)
    raters = []
    for s in range(b):
        ts = v0[s] + n_vis
        n_text = int(inputs["attention_mask"][s, ts:].sum()) if forced is None else None
        raters.append(select_raters(h[s, v0[s]:ts], h[s, ts:ts + n_text]) if n_text else None)
    vc, ref = n_vis, Reference(None, [], [], [])  # type: ignore[arg-type]
    captured: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(dec.layers):
        cos_sin, pos = positions(eager_model, inputs, h, mask2d, src)
        mask = create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=mask2d,
                                  past_key_values=None)
        handle = layer.self_attn.register_forward_hook(
            lambda m, a, o: captured.__setitem__("attn", o[1]))
        y = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos)
        handle.remove()
        if i not in layers:
            h = y
            continue
        stage = layers.index(i)
        probs = captured["attn"].mean(1)  # (B, L, L): all query rows, eager softmax
        new_h, new_mask, new_src = [], [], []
        stage_scores, stage_keep, stage_rec = [], [], []
        for s in range(b):
            ts = v0[s] + vc
            if forced is None:
                rows = ts + raters[s]
                sc = probs[s][rows][:, v0[s]:ts].mean(0)  # (Vc,)
                keep = keep_top(sc, min(targets[stage], vc))
                pruned = torch.tensor([j for j in range(vc) if j not in set(keep.tolist())],
                                      dtype=torch.long)
                rec = recycle(y[s, v0[s] + pruned], sc[pruned]) if len(pruned) else None
                stage_scores.append(sc)
            else:
                keep, rec = forced[0][stage][s], forced[1][stage]
                rec = None if rec is None else rec[s]
            c = 0 if rec is None else rec.shape[0]
            parts = [y[s, :v0[s]], y[s, v0[s] + keep]] + ([rec] if c else []) + [y[s, ts:]]
            new_h.append(torch.cat(parts))
            new_src.append(torch.cat([src[s, :v0[s]], src[s, v0[s] + keep],
                                      src[s, ts - 1].repeat(c), src[s, ts:]]))
            new_mask.append(torch.cat([mask2d[s, :v0[s]],
                                       torch.ones(new_h[-1].shape[0] - v0[s], dtype=torch.bool)]))
            stage_keep.append(keep)
            stage_rec.append(rec)
        h, mask2d, src = torch.stack(new_h), torch.stack(new_mask), torch.stack(new_src)
        vc = stage_keep[0].shape[0] + (0 if stage_rec[0] is None else stage_rec[0].shape[0])
        if forced is None:
            ref.scores.append(torch.stack(stage_scores))
        ref.keep.append(torch.stack(stage_keep))
        ref.recycled.append(None if stage_rec[0] is None else torch.stack(stage_rec))
    ref.logits = eager_model.lm_head(dec.norm(h))
    return ref


def test_keep_all_equals_stock_exactly(model) -> None:
    inputs = image_batch([3, 0], [9, 4])
    with torch.no_grad():
        stock = model(**inputs).logits
        cfg = SparseVLMConfig(keep_counts=(IMAGE_TOKENS,) * 3)
        with SparseVLMPruner(cfg).attach(model) as pruner:
            kept = model(**inputs).logits
        assert pruner.trace is not None and len(pruner.trace.stages) == 3
        after = model(**inputs).logits  # detached: stock again
    assert torch.equal(kept, stock)
    assert torch.equal(after, stock)


def test_rater_rows_equal_eager_attention_rows(eager) -> None:
    inputs = image_batch([2, 0], [7, 3])
    dec = eager.model.language_model
    with torch.no_grad():
        out = eager(**inputs, output_hidden_states=True, output_attentions=True)
        mask2d = inputs["attention_mask"].bool()
        length = mask2d.shape[1]
        pos = (torch.arange(length)[None] - (~mask2d).sum(1, keepdim=True)).clamp(min=0)
        x = out.hidden_states[3]  # input of layer 3
        cos, sin = dec.rotary_emb(x, pos)
        rows = torch.tensor([[length - 5, length - 1], [length - 3, length - 2]])
        got = rater_attention(dec.layers[3], x, rows, mask2d, cos, sin)  # (B, H, 2, L)
    want = out.attentions[3].gather(2, rows[:, None, :, None].expand(-1, 4, -1, length))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pruned_prefill_matches_naive_reference(model, eager) -> None:
    inputs = image_batch([3, 0], [9, 5])
    with torch.no_grad(), SparseVLMPruner(SparseVLMConfig()).attach(model) as pruner:
        logits = model(**inputs).logits
    trace = pruner.trace
    targets = pruner.targets_for(IMAGE_TOKENS)
    ref = naive_reference(eager, inputs, pruner.layers, targets)
    assert [s.layer for s in trace.stages] == list(pruner.layers)
    for st, sc, keep, rec in zip(trace.stages, ref.scores, ref.keep, ref.recycled, strict=True):
        torch.testing.assert_close(st.scores, sc, rtol=0, atol=1e-5)
        assert torch.equal(st.keep, keep)
        assert rec is not None and st.recycled is not None
        torch.testing.assert_close(st.recycled, rec, rtol=0, atol=1e-5)
    assert logits.shape == ref.logits.shape
    for s in range(2):  # compare every real (non-pad) position
        n_pad = int((inputs["attention_mask"][s] == 0).sum())
        torch.testing.assert_close(logits[s, n_pad:], ref.logits[s, n_pad:], rtol=0, atol=2e-5)
    # the pruned sequence really is shorter, and the accounting matches the stages
    assert trace.stages[-1].visual_after < IMAGE_TOKENS
    assert abs(trace.equivalent_tokens / IMAGE_TOKENS - 192 / 576) < 0.02


def test_generate_with_cache_matches_reference_on_extended_sequence(model, eager) -> None:
    inputs = image_batch([3, 0], [9, 5], seed=2)
    steps = 4
    with torch.no_grad(), SparseVLMPruner(SparseVLMConfig()).attach(model) as pruner:
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=[IMAGE_ID, VIDEO_ID])
    trace = pruner.trace
    new = gen.sequences[:, -steps:]
    ext = dict(inputs)
    ext["input_ids"] = torch.cat([inputs["input_ids"], new[:, :-1]], 1)
    ext["attention_mask"] = torch.cat([inputs["attention_mask"],
                                       torch.ones(2, steps - 1, dtype=torch.long)], 1)
    ext["position_ids"] = (ext["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    forced = ([s.keep for s in trace.stages], [s.recycled for s in trace.stages])
    ref = naive_reference(eager, ext, pruner.layers, (), forced=forced)
    for t in range(steps):  # the logits of step t come from position L_final - steps + t
        torch.testing.assert_close(gen.logits[t], ref.logits[:, -steps + t], rtol=0, atol=2e-5)


class _ShapeLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _square_maps(shapes: list[tuple[int, ...]], min_len: int) -> list[tuple[int, ...]]:
    return [s for s in shapes if sum(1 for d in s if d >= min_len) >= 2]


def test_no_length_squared_tensor_and_sdpa_kept(model, eager) -> None:
    inputs = image_batch([3], [150])
    inputs.pop("attention_mask")  # B = 1, no padding: the stock SDPA path builds no mask
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), SparseVLMPruner(SparseVLMConfig()).attach(model) as pruner:
        with _ShapeLog() as log:
            model(**inputs)
        assert model.model.language_model.config._attn_implementation == "sdpa"
    # the shortest sequence any layer sees; every other dim (vocab, width, raters <= 150 text
    # tokens, the vision tower's 64 patches) is smaller
    shortest = length - IMAGE_TOKENS + pruner.trace.stages[-1].visual_after
    assert shortest > 150
    assert _square_maps(log.shapes, shortest) == []
    with torch.no_grad(), _ShapeLog() as log_eager:  # the detector does see an L x L map
        eager(**inputs)
    assert _square_maps(log_eager.shapes, shortest)


def test_config_and_input_errors(model) -> None:
    with pytest.raises(ConfigError, match="keep_ratio"):
        SparseVLMConfig(keep_ratio=0.0)
    with pytest.raises(ConfigError, match="layer_fractions"):
        SparseVLMConfig(layer_fractions=(1.5,))
    with pytest.raises(ConfigError, match="keep_counts"):
        SparseVLMConfig(keep_counts=(10, 5))
    inputs = image_batch([1, 1], [3, 3])
    ids = inputs["input_ids"]
    v0 = int((ids[0] == IMAGE_ID).nonzero()[0])
    ids[0, v0 + 5], ids[0, -1] = 50, IMAGE_ID  # sample 0: still 136 visual tokens, two blocks
    with SparseVLMPruner(SparseVLMConfig()).attach(model), pytest.raises(
            ConfigError, match="contiguous"):
        model(**inputs)


def video_batch(frames: torch.Tensor, texts: list[int], seed: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded batch with one video each: [bos, <video>*(F*16+1), text...]."""
    g = torch.Generator().manual_seed(seed)
    n_vis = frames.shape[1] * 16 + 1
    seqs = [[1] + [VIDEO_ID] * n_vis + torch.randint(3, 100, (t,), generator=g).tolist()
            for t in texts]
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = torch.tensor(s)
        mask[b, length - len(s):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=frames,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def test_vidcom2_frame_budgets_drive_per_frame_selection(model) -> None:
    g = torch.Generator().manual_seed(5)
    still = torch.randn(3, 32, 32, generator=g)
    # frames 0-3 identical, 4-5 distinct: VidCom2 rates the distinct frames as more unique
    video = torch.stack([still] * 4 + [torch.randn(3, 32, 32, generator=g) for _ in range(2)])
    inputs = video_batch(torch.stack([video, video.flip(0)]), [8, 5])
    cfg = VidCom2SparseVLMConfig(keep_ratio=0.3)
    with torch.no_grad(), SparseVLMPruner(cfg).attach(model) as pruner:
        model(**inputs)
        trace = pruner.trace
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                             suppress_tokens=[IMAGE_ID, VIDEO_ID])
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    first = trace.stages[0]
    frame_of = torch.arange(97) // 16  # 6 frames x 16 tokens + 1 newline (frame 6 = none)
    counts = torch.stack([torch.bincount(frame_of[first.keep[s]], minlength=7)
                          for s in range(2)])  # (B, 7)
    distinct = [(4, 5), (0, 1)]  # the video is reversed in sample 1
    for s, (a, c) in enumerate(distinct):
        repeated = [f for f in range(6) if f not in (a, c)]
        assert min(counts[s, a], counts[s, c]) > max(counts[s, f] for f in repeated)
    # the same budgets under plain SparseVLM would not be frame-aware: compare with the planner
    with torch.no_grad(), SparseVLMPruner(SparseVLMConfig(keep_ratio=0.3)).attach(model) as p2:
        model(**inputs)
    assert not torch.equal(p2.trace.stages[0].keep, first.keep)


def test_frame_keep_honours_allocation() -> None:
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.05])
    frames = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    keep = frame_keep(scores, frames, torch.tensor([1.0, 1.0, 2.0]), 4)
    # the unframed token's proportional share is round(4 / 7) = 1; the other 3 split 1:1:2 as
    # quotas 0.75, 0.75, 1.5 -> floors 0, 0, 1, then the largest remainders -> 1, 1, 1
    assert keep.tolist() == [0, 2, 5, 6]
    keep = frame_keep(scores, frames, torch.tensor([1.0, 1.0, 2.0]), 3)  # share 0 -> 1, 1, 1
    assert keep.tolist() == [0, 2, 5]
    assert allocate(10, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([3, 10, 10])).tolist() == [
        3, 2, 5]
    assert allocate(9, torch.tensor([5.0, 1.0, 1.0]), torch.tensor([2, 5, 5])).tolist() == [
        2, 4, 3]


def tiny_qwen2vl(attn: str = "sdpa") -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                              mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    return Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def qwen_image_batch(texts: list[int], seed: int = 4) -> dict[str, torch.Tensor]:
    """Left-padded: [bos, <vision_start>, <image>*64, <vision_end>, text...] (16x16 patches)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [[1, VSTART] + [IMAGE_ID] * 64 + [VEND]
            + torch.randint(3, 100, (t,), generator=g).tolist() for t in texts]
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):] = torch.tensor(s)
        mask[b, length - len(s):] = 1
    n = len(seqs)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_ID).int(),
                pixel_values=torch.randn(n * 256, 3 * 2 * 16, generator=g),
                image_grid_thw=torch.tensor([[1, 16, 16]] * n))


def test_qwen2vl_keep_all_stock_and_cached_decode_matches_reference() -> None:
    model = tiny_qwen2vl()
    eager_model = tiny_qwen2vl("eager")
    eager_model.load_state_dict(model.state_dict())
    inputs = qwen_image_batch([9, 5])
    steps = 3
    with torch.no_grad():
        stock = model(**inputs).logits
        with SparseVLMPruner(SparseVLMConfig(keep_counts=(64,) * 3)).attach(model):
            assert torch.equal(model(**inputs).logits, stock)
        with SparseVLMPruner(SparseVLMConfig()).attach(model) as pruner:
            gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, output_logits=True,
                                 return_dict_in_generate=True,
                                 suppress_tokens=[IMAGE_ID, VIDEO_ID])
    trace = pruner.trace
    assert trace.stages[-1].visual_after < 64
    ext = dict(inputs)
    ext["input_ids"] = torch.cat([inputs["input_ids"], gen.sequences[:, -steps:-1]], 1)
    ext["attention_mask"] = torch.cat([inputs["attention_mask"],
                                       torch.ones(2, steps - 1, dtype=torch.long)], 1)
    ext["mm_token_type_ids"] = (ext["input_ids"] == IMAGE_ID).int()
    forced = ([s.keep for s in trace.stages], [s.recycled for s in trace.stages])
    ref = naive_reference(eager_model, ext, pruner.layers, (), forced=forced,
                          positions=kept_mrope_positions)
    for t in range(steps):
        torch.testing.assert_close(gen.logits[t], ref.logits[:, -steps + t], rtol=0, atol=2e-5)


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by ops (parameters and inputs excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.exclude:
                    refs = self.live.setdefault(key, (st.nbytes(), []))[1]
                    refs.append(weakref.ref(t))
        self.live = {k: v for k, v in self.live.items() if any(r() is not None for r in v[1])}
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


def test_peak_memory_not_above_stock_sdpa(model) -> None:
    """Realistic proportions: raters x heads (about 10 x 4) stay below the MLP width (128)."""
    inputs = image_batch([3], [20])
    inputs.pop("attention_mask")
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    exclude |= {v.untyped_storage().data_ptr() for v in inputs.values()}

    def peak(pruned: bool) -> int:
        with torch.no_grad():
            if pruned:
                with SparseVLMPruner(SparseVLMConfig()).attach(model), _PeakLiveBytes(
                        exclude) as meter:
                    model(**inputs, logits_to_keep=1)
            else:
                with _PeakLiveBytes(exclude) as meter:
                    model(**inputs, logits_to_keep=1)
        return meter.peak

    stock, sparse = peak(False), peak(True)
    assert stock > 0 and sparse <= stock, (stock, sparse)


def test_qwen2vl_video_frame_budgets_in_generate() -> None:
    """generate() passes Qwen2-VL no video grid: frames come from the M-RoPE temporal index."""
    model = tiny_qwen2vl()
    g = torch.Generator().manual_seed(0)
    t, h, w = 4, 8, 8  # 4 temporal patches of 16 merged tokens
    seq = [1, VSTART] + [VIDEO_ID] * 64 + [VEND] + torch.randint(3, 100, (7,), generator=g).tolist()
    ids = torch.tensor([seq, seq])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == VIDEO_ID).int() * 2,
                  pixel_values_videos=torch.randn(2 * t * h * w, 3 * 2 * 16, generator=g),
                  video_grid_thw=torch.tensor([[t, h, w]] * 2))
    cfg = VidCom2SparseVLMConfig(keep_ratio=0.3)
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0]  # (B, L, D)
        with SparseVLMPruner(cfg).attach(model) as pruner:
            gen = model.generate(**inputs, max_new_tokens=2, do_sample=False,
                                 suppress_tokens=[IMAGE_ID, VIDEO_ID])
    assert gen.shape[1] == ids.shape[1] + 2
    first = pruner.trace.stages[0]
    frame_ids = torch.arange(64) // 16
    for s in range(2):
        weights = vidcom2_scores(embeds[s, 2:66], 16, 0.3).scales
        want = frame_keep(first.scores[s], frame_ids, weights, first.keep.shape[1])
        assert torch.equal(first.keep[s], want)


def test_peft_lora_model_scores_use_the_adapter(model) -> None:
    """On a peft-wrapped student the raters' attention comes from the LoRA-adapted q/k."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llava_ov()
    base.load_state_dict(model.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
    peft_model = get_peft_model(base, lora).eval()
    inputs = image_batch([2, 0], [6, 4])
    with torch.no_grad():
        with SparseVLMPruner(SparseVLMConfig()).attach(peft_model) as p_lora:
            lora_logits = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        with SparseVLMPruner(SparseVLMConfig()).attach(merged) as p_merged:
            merged_logits = merged(**inputs).logits
        with SparseVLMPruner(SparseVLMConfig()).attach(model) as p_stock:
            model(**inputs)
    for a, b in zip(p_lora.trace.stages, p_merged.trace.stages, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
        assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(lora_logits, merged_logits, rtol=0, atol=1e-4)
    assert not torch.allclose(p_lora.trace.stages[0].scores, p_stock.trace.stages[0].scores)
