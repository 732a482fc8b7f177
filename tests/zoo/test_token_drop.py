"""Token-drop training (stages B/C): dropped visual placeholders leave the sequence, the kept
ones and the text keep the positions they had in the full prompt, answers are unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from shared.media import procedural as P
from shared.models.pretrain import (
    StageSchedule,
    _drop_keep,
    _drop_tokens,
    cache_visual_tokens,
    train_language,
)
from shared.models.processor import VLMProcessor
from shared.models.zoo import ZOOS, make_tokenizer_ids


@pytest.fixture(scope="module")
def proc() -> VLMProcessor:
    tok, _ = make_tokenizer_ids()
    return VLMProcessor.from_spec(ZOOS["default"].spec("teacher"), tok, "question_both")


def test_dropped_placeholders_leave_and_the_rest_keep_full_prompt_positions(proc) -> None:
    samples = P.batch("source", 3, seed=2, media_kind="video")
    text = proc.text_inputs([s.question for s in samples], [s.answer for s in samples], "video")
    n = proc.num_visual_tokens("video")
    keeps = [torch.tensor([0, 5, n - 1]), torch.arange(n), torch.tensor([7])]
    out = _drop_tokens(text, proc.video_id, keeps, proc.pad_id)
    full_pos = (text["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for r, keep in enumerate(keeps):
        mask = out["attention_mask"][r].bool()
        ids, pos = out["input_ids"][r][mask], out["position_ids"][r][mask]
        assert int((ids == proc.video_id).sum()) == keep.numel()
        assert bool((out["input_ids"][r][~mask] == proc.pad_id).all())
        assert not bool(mask[: int((~mask).sum())].any())  # left-padded again
        real = text["attention_mask"][r].bool()
        src_ids, src_pos = text["input_ids"][r][real], full_pos[r][real]
        vis = (src_ids == proc.video_id).nonzero().squeeze(1)  # (N,)
        assert torch.equal(pos[ids == proc.video_id], src_pos[vis[keep]])
        # text before and after the block: same ids at the same positions
        text_mask = src_ids != proc.video_id
        assert torch.equal(ids[ids != proc.video_id], src_ids[text_mask])
        assert torch.equal(pos[ids != proc.video_id], src_pos[text_mask])
        labels = out["labels"][r][mask]
        assert torch.equal(labels[labels != -100], text["labels"][r][text["labels"][r] != -100])


def test_drop_keep_is_sorted_unique_and_in_range() -> None:
    gen = torch.Generator().manual_seed(0)
    aux = torch.zeros(73, 4, dtype=torch.long)
    aux[::9, 0] = 3  # tokens that show an object
    sizes = []
    for _ in range(200):
        keep = _drop_keep(73, aux, gen)
        assert bool((keep[1:] > keep[:-1]).all()) and 0 <= int(keep[0]) and int(keep[-1]) < 73
        sizes.append(keep.numel())
    assert min(sizes) >= round(73 * 0.1) and max(sizes) <= round(73 * 0.6)


def _test_zoo_teacher(test_zoo):
    """The test zoo's teacher in fp32 train mode, its processor, 16 source videos and their
    cached visual tokens."""
    from shared.models.checkpoint import load_vlm

    loaded = load_vlm(test_zoo.teacher)
    model, tproc = loaded.model.float().train(), loaded.processor
    samples = P.batch("source", 16, seed=5, media_kind="video",
                      config=P.GeneratorConfig(frame_size=tproc.config.image_size,
                                               num_frames=tproc.config.num_frames))
    return model, tproc, samples, cache_visual_tokens(model, tproc, samples, progress=False)


def test_train_language_with_token_drop_lowers_its_loss(test_zoo) -> None:
    model, tproc, samples, tokens = _test_zoo_teacher(test_zoo)
    first = train_language(model, tproc, samples, tokens, StageSchedule(1, 1e-3, 8, warmup=1),
                           seed=0, desc="t", progress=False, aux_weight=1.0, token_drop=1.0)
    last = train_language(model, tproc, samples, tokens, StageSchedule(40, 3e-3, 8, warmup=1),
                          seed=0, desc="t", progress=False, aux_weight=1.0, token_drop=1.0)
    assert math.isfinite(first) and last < first


def test_bf16_training_lowers_its_loss_and_restores_the_attention(test_zoo) -> None:
    from shared.models.pretrain import train_vision

    model, tproc, samples, tokens = _test_zoo_teacher(test_zoo)
    before = model.config._attn_implementation
    kw = {"seed": 0, "desc": "t", "progress": False, "aux_weight": 1.0}
    first = train_language(model, tproc, samples, tokens,
                           StageSchedule(1, 1e-3, 8, warmup=1, precision="bf16"), **kw)
    last = train_language(model, tproc, samples, tokens,
                          StageSchedule(40, 3e-3, 8, warmup=1, precision="bf16"), **kw)
    assert math.isfinite(first) and last < first
    parts = train_vision(model, tproc, samples,
                         StageSchedule(2, 1e-3, 4, warmup=1, precision="bf16"), seed=0,
                         progress=False)
    assert all(math.isfinite(v) for v in parts.values())
    assert model.config._attn_implementation == before
    assert all(p.dtype == torch.float32 for p in model.parameters())
