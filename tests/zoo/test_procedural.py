"""Procedural QA generator: determinism, question mix, time dependence, domain shift."""

from __future__ import annotations

import pytest
import torch

from shared.errors import ConfigError
from shared.media import procedural as P


def test_stream_is_deterministic_and_batch_is_its_prefix() -> None:
    a = P.batch("clutter", 6, seed=3)
    it = P.stream("clutter", seed=3)
    b = [next(it) for _ in range(6)]
    for x, y in zip(a, b, strict=True):
        assert x.sample_id == y.sample_id
        assert torch.equal(x.frames, y.frames)
        assert (x.question, x.answer, x.qtype) == (y.question, y.answer, y.qtype)
    c = P.batch("clutter", 6, seed=4)
    assert not all(torch.equal(x.frames, y.frames) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("kind", ["video", "image"])
def test_sample_shapes_and_vocabulary(kind: str) -> None:
    answers = {*P.COLOR_NAMES, *P.SHAPES, *P.DIRECTIONS, *P.COUNT_WORDS, "yes", "no"}
    for s in P.batch("source", 20, seed=0, media_kind=kind):
        assert s.frames.dtype == torch.uint8
        assert s.frames.shape == ((8 if kind == "video" else 1), 48, 48, 3)
        assert s.media_kind == kind
        assert s.answer in answers
        assert s.qtype in (P.VIDEO_QTYPES if kind == "video" else P.IMAGE_QTYPES)


def test_a_third_of_video_questions_need_a_middle_frame() -> None:
    samples = P.batch("source", 60, seed=1)
    middle = [s for s in samples if s.qtype in P.MIDDLE_FRAME_QTYPES]
    assert len(middle) >= len(samples) / 3
    for s in middle:
        flash = [k for k, o in enumerate(s.objects) if o.shape == P.FLASH_SHAPE]
        assert len(flash) == 1
        on = (s.object_map == flash[0]).flatten(1).any(1)  # (F,) frames showing the flash
        assert not on[0] and not on[-1] and on.any()
        assert s.answer == s.objects[flash[0]].color


def test_direction_answer_matches_motion() -> None:
    for s in P.batch("source", 40, seed=2):
        if s.qtype != "direction":
            continue
        mover = [o for o in s.objects if o.shape != P.FLASH_SHAPE and
                 not (o.centers[0] == o.centers[-1]).all()]
        assert len(mover) == 1
        dx, dy = mover[0].centers[-1] - mover[0].centers[0]
        expect = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else (
            "down" if dy > 0 else "up")
        assert s.answer == expect


def test_count_answers_match_scene() -> None:
    for s in P.batch("blur", 40, seed=5, media_kind="image"):
        if s.qtype == "count":
            colour = s.question.split()[2]
            n = sum(o.color == colour for o in s.objects if o.shape != P.FLASH_SHAPE)
            assert s.answer == str(n)


def test_domains_shift_pixels_but_keep_the_scene() -> None:
    src = P.batch("source", 8, seed=7)
    means = {}
    for d in P.DOMAINS:
        b = P.batch(d, 8, seed=7)
        # same index -> same question type schedule; the scene layout differs per domain seed
        assert [s.qtype for s in b] == [s.qtype for s in src]
        means[d] = torch.stack([s.frames.float().mean((0, 1, 2)) for s in b]).mean(0)
    assert means["low_light"].mean() < 0.5 * means["source"].mean()
    cast = means["color_cast"]
    assert cast[0] - cast[2] > 15  # warm cast: red channel well above blue
    std = {d: torch.stack([s.frames.float()[:, :40].std() for s in P.batch(d, 8, seed=7)]).mean()
           for d in ("source", "clutter")}
    assert std["clutter"] > std["source"]
    blur = P.batch("blur", 8, seed=7)
    grad = {n: torch.stack([x.frames.float().diff(dim=2).abs().flatten().quantile(0.99)
                            for x in b]).mean()
            for n, b in (("source", src), ("blur", blur))}
    assert grad["blur"] < 0.8 * grad["source"]


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="domain"):
        P.batch("fog", 1, seed=0)
    with pytest.raises(ConfigError, match="media_kind"):
        P.batch("source", 1, seed=0, media_kind="audio")
    with pytest.raises(ConfigError, match="num_frames"):
        P.GeneratorConfig(num_frames=2)
