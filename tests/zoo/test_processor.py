"""Tokenizer and processor: round-trips and the input layout each architecture expects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.errors import ConfigError
from shared.media import procedural as P
from shared.models import tokenizer as T
from shared.models.architectures import VLMSpec
from shared.models.processor import VLMProcessor


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer()


def test_tokenizer_round_trip(tok, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    text = "is there a purple triangle ?"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False).input_ids == ids
    assert again.convert_tokens_to_ids(list(T.SPECIAL_TOKENS)) == tok.convert_tokens_to_ids(
        list(T.SPECIAL_TOKENS))
    for s in P.batch("source", 20, seed=0) + P.batch("source", 8, seed=0, media_kind="image"):
        assert tok.unk_token_id not in tok(s.question + " " + s.answer).input_ids


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_processor_layout_and_labels(tok, arch: str) -> None:
    proc = VLMProcessor.from_spec(VLMSpec(architecture=arch), tok)
    vids = P.batch("source", 3, seed=0)
    out = proc(vids, answers=True)
    n_vis = proc.num_visual_tokens("video")
    assert ((out["input_ids"] == proc.video_id).sum(1) == n_vis).all()
    # labels supervise exactly the answer word and <eos>
    for i, s in enumerate(vids):
        lab = out["labels"][i][out["labels"][i] != -100].tolist()
        assert lab == [*tok(s.answer, add_special_tokens=False).input_ids, proc.eos_id]
    assert out["attention_mask"][:, -1].all()  # left padding
    if arch == "llava_onevision":
        assert out["pixel_values_videos"].shape == (3, 8, 3, 48, 48)
        assert n_vis == 8 * 9 + 1
    else:
        assert out["video_grid_thw"].tolist() == [[4, 6, 6]] * 3
        assert out["pixel_values_videos"].shape == (3 * 4 * 36, 3 * 2 * 8 * 8)
        assert (out["mm_token_type_ids"] == 2).sum() == 3 * n_vis
    imgs = P.batch("source", 2, seed=0, media_kind="image")
    out = proc(imgs)
    assert "labels" not in out
    assert ((out["input_ids"] == proc.image_id).sum(1) == proc.num_visual_tokens("image")).all()
    with pytest.raises(ConfigError, match="all images or all videos"):
        proc([vids[0], imgs[0]])


def test_qwen_patch_order_matches_the_transformers_image_processor(tok) -> None:
    from transformers import Qwen2VLImageProcessorPil

    proc = VLMProcessor.from_spec(VLMSpec(architecture="qwen2_vl"), tok)
    img = P.batch("source", 1, seed=0, media_kind="image")[0]
    ours = proc([img])["pixel_values"]
    ref = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_resize=False, do_convert_rgb=False)
    theirs = ref(images=[img.frames[0].numpy()], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert torch.allclose(ours, theirs["pixel_values"], atol=1e-5)


def test_processor_save_load_round_trip(tok, tmp_path: Path) -> None:
    proc = VLMProcessor.from_spec(VLMSpec(architecture="qwen2_vl", num_frames=4), tok)
    proc.save_pretrained(tmp_path)
    again = VLMProcessor.from_pretrained(tmp_path)
    assert again.config == proc.config
    s = P.batch("low_light", 2, seed=1)
    a, b = proc(s, answers=True), again(s, answers=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="cdca_processor.json"):
        VLMProcessor.from_pretrained(tmp_path / "missing")


def test_processor_accepts_raw_frames_of_any_size(tok) -> None:
    proc = VLMProcessor.from_spec(VLMSpec(), tok)
    clip = torch.randint(0, 255, (20, 90, 120, 3), dtype=torch.uint8)  # longer, larger
    out = proc(([clip], ["which way is the object moving?"]), answers=["left"])
    assert out["pixel_values_videos"].shape == (1, 8, 3, 48, 48)
    with pytest.raises(ConfigError, match="uint8"):
        proc(([clip.float()], ["q"]))
