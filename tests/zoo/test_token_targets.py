"""Per-visual-token auxiliary targets of stages B/C: aligned with the architectures' token
layouts and faithful to the scene (which object, named by the question, moving which way)."""

from __future__ import annotations

import pytest
import torch

from shared.media import procedural as P
from shared.models.pretrain import AUX_CLASSES, token_targets
from shared.models.processor import VLMProcessor
from shared.models.zoo import ZooConfig, make_tokenizer_ids

COLOUR, SHAPE, RELEVANT, MOTION = range(4)


@pytest.fixture(scope="module")
def processors() -> dict[str, VLMProcessor]:
    tok, _ = make_tokenizer_ids()
    return {arch: VLMProcessor.from_spec(ZooConfig(architecture=arch).spec("teacher"), tok,
                                         "question_both")
            for arch in ("llava_onevision", "qwen2_vl")}


def _first_of(qtype: str, kind: str) -> P.QASample:
    return next(s for s in (P.sample("source", 3, i, kind) for i in range(40))
                if s.qtype == qtype)


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
def test_one_row_per_visual_token_in_class_range(processors, arch: str, kind: str) -> None:
    proc = processors[arch]
    for s in P.batch("clutter", 8, seed=1, media_kind=kind):
        t = token_targets(s, proc)
        assert t.shape == (proc.num_visual_tokens(kind), len(AUX_CLASSES))
        valid = t[t[:, 0] != -100]
        assert len(valid) > 0
        for j, n in enumerate(AUX_CLASSES):
            assert 0 <= valid[:, j].min() and valid[:, j].max() < n


def test_llava_video_rows_follow_frames_then_cells(processors) -> None:
    s = _first_of("direction", "video")
    t = token_targets(s, processors["llava_onevision"])
    grid = s.frames.shape[1] // P.CELL
    cells = grid * grid
    assert (t[-1] == -100).all()  # the closing newline has no object
    per_frame = t[:-1].view(s.frames.shape[0], cells, 4)
    mover = s.objects[0]  # the generator draws the moving object first
    want = 1 + P.DIRECTIONS.index(s.answer)
    for f in (0, s.frames.shape[0] - 1):
        x, y = (mover.centers[f] // P.CELL).astype(int)
        row = per_frame[f, y * grid + x]
        assert row[MOTION] == want and row[RELEVANT] == 1
        assert row[COLOUR] == 1 + P.COLOR_NAMES.index(mover.color)
    # only the mover is relevant to "which way": 1 token per frame
    assert (per_frame[..., RELEVANT] == 1).sum(1).tolist() == [1] * s.frames.shape[0]


def test_flash_is_relevant_only_in_the_frames_that_show_it(processors) -> None:
    s = _first_of("flash", "video")
    t = token_targets(s, processors["llava_onevision"])[:-1].view(s.frames.shape[0], -1, 4)
    shown = s.objects[-1].visible
    assert (t[..., RELEVANT].sum(1) > 0).tolist() == shown.tolist()
    assert not shown[0] and not shown[-1]


@pytest.mark.parametrize("kind", ["video", "image"])
def test_count_answer_equals_relevant_objects(processors, kind: str) -> None:
    for s in [x for x in P.batch("source", 40, seed=5, media_kind=kind) if x.qtype == "count"]:
        t = token_targets(s, processors["qwen2_vl"])  # one token per cell (and pair)
        per_unit = t.view(-1, 9, 4)[0]  # first frame (pair) or the image
        assert int(per_unit[:, RELEVANT].sum()) == int(s.answer)


def test_llava_image_patches_share_their_cell_and_newlines_are_ignored(processors) -> None:
    s = _first_of("exists", "image")
    t = token_targets(s, processors["llava_onevision"])
    g = 6  # 48 px / 8 px patches
    base = t[: g * g].view(g, g, 4)
    crop = t[g * g:].view(g, g + 1, 4)
    assert (crop[:, -1] == -100).all()
    assert torch.equal(crop[:, :-1], base)
    assert torch.equal(base[0::2, 0::2], base[1::2, 1::2])  # 2 x 2 patches = one cell


def test_no_targets_when_tokens_are_not_one_per_cell() -> None:
    tok, _ = make_tokenizer_ids()
    proc = VLMProcessor.from_spec(ZooConfig(patch_size=16, vision_hidden=96).spec("teacher"),
                                  tok, "question_both")
    assert token_targets(P.sample("source", 0, 0), proc) is None
