"""Pre-LLM compression inside real (tiny, random) HF VLMs: exactness with all tokens kept,
M-RoPE on the full grid, generate(), batch > 1, exact counts, records for upload."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from device.compress import COMPRESSORS
from device.compress.base import KeepPlan, Stage, VisualBatch
from device.vlm.compressed import CompressedVLM
from shared.errors import ConfigError
from tests.compress import tiny

QWEN_BUILDERS = [tiny.tiny_qwen2vl, tiny.tiny_qwen25vl]
QWEN_GRIDS = [(4, 4, 6), (2, 6, 4)]  # (t, h, w) patches -> 4x6 / 2x6 merged tokens


def _qwen_video_inputs(grids=QWEN_GRIDS, long_tail: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    pv = torch.cat([tiny.qwen_video(*g, gen) for g in grids])
    seqs = [tiny.qwen_prompt(t * h * w // 4, tiny.VIDEO_ID, [tiny.BOS, 5, 6], [7, 8, 9])
            for t, h, w in grids]
    if long_tail and len(seqs) > 1:
        seqs[1] += list(range(10, 30))  # rows of different length -> padding
    ids, mask = tiny.pad_batch(seqs)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pv,
                video_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == tiny.VIDEO_ID).int() * 2)


def _qwen_image_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    grids = [(1, 4, 4), (1, 6, 4)]
    pv = torch.cat([tiny.qwen_video(*g, gen) for g in grids])
    seqs = [tiny.qwen_prompt(h * w // 4, tiny.IMAGE_ID, [tiny.BOS], [7, 8]) for _, h, w in grids]
    ids, mask = tiny.pad_batch(seqs)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv,
                image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == tiny.IMAGE_ID).int())


def _llava_video_inputs(frames: int = 4) -> dict:
    pv = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    n = frames * 16 + 1
    ids, mask = tiny.pad_batch([[tiny.BOS, 5] + [tiny.VIDEO_ID] * n + [7, 8],
                                [tiny.BOS, 5, 9, 9, 9] + [tiny.VIDEO_ID] * n + [7, 8]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pv)


CASES: list[tuple[str, Callable, Callable]] = [
    ("qwen2vl-video", tiny.tiny_qwen2vl, _qwen_video_inputs),
    ("qwen25vl-video", tiny.tiny_qwen25vl, _qwen_video_inputs),
    ("qwen2vl-image", tiny.tiny_qwen2vl, _qwen_image_inputs),
    ("llava-ov-video", tiny.tiny_llava_ov, _llava_video_inputs),
]


@pytest.mark.parametrize(("name", "build", "make"), CASES, ids=[c[0] for c in CASES])
def test_keep_all_equals_stock_model_exactly(name: str, build: Callable, make: Callable) -> None:
    model, inputs = build(), make()
    with torch.no_grad():
        ref = model(**inputs).logits
        out, ci = CompressedVLM(model, COMPRESSORS.build("none")).forward(inputs)
    assert torch.equal(ci.input_ids, inputs["input_ids"])
    assert (out.logits - ref).abs().max().item() == 0.0
    stock = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    ours = CompressedVLM(model, COMPRESSORS.build("none")).generate(
        inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.new_tokens, stock[:, inputs["input_ids"].shape[1]:])


def _manual_reference(model, inputs: dict, ci) -> torch.Tensor:
    """Logits of the stock model fed the full sequence's embeddings and M-RoPE positions at the
    kept columns only: an independent route to what compression must compute."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    base = model.model
    emb = base.get_input_embeddings()(ids)  # (B, L, D)
    feats = torch.cat(base.get_video_features(inputs["pixel_values_videos"],
                                              inputs["video_grid_thw"]).pooler_output)
    emb = emb.masked_scatter((ids == tiny.VIDEO_ID)[..., None], feats)
    pos, _ = base.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                 video_grid_thw=inputs["video_grid_thw"], attention_mask=mask)
    survive = mask.bool().clone()
    for k in ci.kept:
        rows = (ids[k.sample] == tiny.VIDEO_ID).nonzero().squeeze(1)
        dropped = torch.ones(rows.numel(), dtype=torch.bool)
        dropped[k.keep] = False
        survive[k.sample, rows[dropped]] = False
    logits = []
    for b in range(ids.shape[0]):
        cols = survive[b].nonzero().squeeze(1)
        out = model(inputs_embeds=emb[b:b + 1, cols], position_ids=pos[:, b:b + 1, cols])
        logits.append(out.logits[0, -1])
    return torch.stack(logits)  # (B, V)


@pytest.mark.parametrize("build", QWEN_BUILDERS, ids=["qwen2vl", "qwen25vl"])
def test_qwen_compressed_tokens_keep_full_grid_positions(build: Callable) -> None:
    model, inputs = build(), _qwen_video_inputs()
    cv = CompressedVLM(model, COMPRESSORS.build("vidcom2", {"keep_ratio": 0.25}))
    with torch.no_grad():
        out, ci = cv.forward(inputs)
        ref = _manual_reference(model, inputs, ci)
    assert ci.visual_tokens_kept.tolist() == [k.keep.numel() for k in ci.kept]
    assert bool((ci.visual_tokens_kept < ci.visual_tokens_in).all())
    assert torch.allclose(out.logits[:, -1], ref, atol=1e-5)
    # the kept video tokens carry exactly their full-grid (t, h, w) positions
    full, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"])
    for rec in ci.kept:
        b = rec.sample
        full_video = full[:, b, inputs["input_ids"][b] == tiny.VIDEO_ID]  # (3, N)
        kept_video = ci.position_ids[:, b, ci.input_ids[b] == tiny.VIDEO_ID]  # (3, K)
        assert torch.equal(kept_video, full_video[:, rec.keep])


@pytest.mark.parametrize(("name", "build", "make"), CASES, ids=[c[0] for c in CASES])
def test_batch_generate_equals_one_by_one(name: str, build: Callable, make: Callable) -> None:
    model, inputs = build(), make()
    cv = CompressedVLM(model, COMPRESSORS.build("vidcom2", {"keep_ratio": 0.5}))
    with torch.no_grad():
        batch_out, ci = cv.forward(inputs)
        b_last = batch_out.logits[:, -1]
        for b in range(inputs["input_ids"].shape[0]):
            single = _row(inputs, b)
            out, ci1 = cv.forward(single)
            assert torch.allclose(out.logits[0, -1], b_last[b], atol=1e-5)
            assert [k.keep.tolist() for k in ci1.kept] == [
                k.keep.tolist() for k in ci.for_sample(b)]
    gen = cv.generate(inputs, max_new_tokens=4, do_sample=False)
    assert gen.new_tokens.shape == (inputs["input_ids"].shape[0], 4)


def _row(inputs: dict, b: int) -> dict:
    """Batch row b alone, unpadded."""
    keep = inputs["attention_mask"][b].bool()
    single = {k: inputs[k][b:b + 1, keep] for k in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in inputs:
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][b:b + 1, keep]
    pairs = (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw"))
    for pix, grid in pairs:
        if pix not in inputs:
            continue
        if grid in inputs:
            sizes = inputs[grid].prod(-1).tolist()
            single[pix] = torch.split(inputs[pix], sizes)[b]
            single[grid] = inputs[grid][b:b + 1]
        else:
            single[pix] = inputs[pix][b:b + 1]
    return single


@pytest.mark.parametrize(("name", "build", "make"), CASES, ids=[c[0] for c in CASES])
def test_exact_count_and_upload_records(name: str, build: Callable, make: Callable) -> None:
    model, inputs = build(), make()
    cv = CompressedVLM(model, COMPRESSORS.build("vidcom2", {"keep_ratio": 0.3,
                                                           "exact_count": True}))
    with torch.no_grad():
        ci = cv.prepare(inputs)
        items = cv.encode(inputs)
    flat = [it for m in ("image", "video") for it in items[m]]
    assert len(ci.kept) == len(flat)
    for rec, it in zip(ci.kept, flat, strict=True):
        grid = rec.frames * rec.tokens_per_frame
        assert int((rec.keep < grid).sum()) == round(0.3 * grid)
        assert rec.num_tokens - grid == int((rec.keep >= grid).sum())  # extras always kept
        assert torch.equal(rec.features, it.features[rec.keep])
    counts = (ci.input_ids != tiny.PAD).sum(1) - (inputs["input_ids"] != tiny.PAD).sum(1)
    assert torch.equal(-counts, ci.visual_tokens_in - ci.visual_tokens_kept)


def test_in_llm_compressor_and_bad_inputs_are_rejected() -> None:
    class InLLM:
        stage = Stage.IN_LLM

        def select(self, batch: VisualBatch) -> KeepPlan:
            return KeepPlan(keep=torch.arange(1))

    model = tiny.tiny_qwen2vl()
    with pytest.raises(ConfigError, match="in_llm"):
        CompressedVLM(model, InLLM())
    inputs = _qwen_video_inputs()
    inputs["input_ids"] = inputs["input_ids"][:, :-12]
    inputs["attention_mask"] = inputs["attention_mask"][:, :-12]
    with pytest.raises(ConfigError, match="placeholders"):
        CompressedVLM(model, COMPRESSORS.build("none")).prepare(inputs)


def test_peft_wrapped_model_and_beam_search() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.tiny_qwen2vl(), LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    inputs = _qwen_video_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
        out, _ = CompressedVLM(model, COMPRESSORS.build("none")).forward(inputs)
    assert (out.logits - ref).abs().max().item() == 0.0
    stock = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    ours = CompressedVLM(model, COMPRESSORS.build("none")).generate(
        inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    assert torch.equal(ours.new_tokens, stock[:, inputs["input_ids"].shape[1]:])


def test_llava_original_positions_option() -> None:
    model, inputs = tiny.tiny_llava_ov(), _llava_video_inputs()
    row = {k: v[1:] for k, v in inputs.items()}  # the unpadded row: stock positions 0..L-1
    with torch.no_grad():
        ref = model(**row).logits
        out, ci = CompressedVLM(model, COMPRESSORS.build("none"),
                                original_positions=True).forward(row)
        assert (out.logits - ref).abs().max().item() == 0.0
        cv = CompressedVLM(model, COMPRESSORS.build("vidcom2", {"keep_ratio": 0.25}),
                           original_positions=True)
        ci = cv.prepare(inputs)
    assert ci.position_ids is not None and ci.position_ids.shape == ci.input_ids.shape
    for rec in ci.kept:
        b = rec.sample
        real = inputs["attention_mask"][b].bool()
        full_video = (inputs["input_ids"][b][real] == tiny.VIDEO_ID).nonzero().squeeze(1)
        kept_pos = ci.position_ids[b, ci.input_ids[b] == tiny.VIDEO_ID]
        assert torch.equal(kept_pos, full_video[rec.keep])
    gen = cv.generate(inputs, max_new_tokens=3, do_sample=False)
    assert gen.new_tokens.shape == (2, 3)
