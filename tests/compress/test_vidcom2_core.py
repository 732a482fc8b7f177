"""VidCom2 core invariants beyond the official vectors: budgets, exact count, structure."""

from __future__ import annotations

import pytest
import torch

from device.compress import COMPRESSORS, VisualBatch
from device.compress.vidcom2 import (
    VidCom2Compressor,
    VidCom2Config,
    reconcile_budgets,
    select_by_budget,
    vidcom2_frame_budgets,
    vidcom2_keep_indices,
    vidcom2_scores,
)
from shared.errors import ConfigError


def _video(frames: int, m: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames * m, d, generator=torch.Generator().manual_seed(seed))


def test_distinct_frame_gets_more_tokens_than_repeated_ones() -> None:
    g = torch.Generator().manual_seed(1)
    scene = 3 * torch.randn(32, generator=g) + torch.randn(16, 32, generator=g)  # (16, 32)
    frames = [scene + 0.05 * torch.randn(16, 32, generator=g) for _ in range(7)]
    cut = 3 * torch.randn(32, generator=g) + torch.randn(16, 32, generator=g)  # a scene cut
    frames.insert(3, cut)
    x = torch.cat(frames)  # (8*16, 32)
    ks = vidcom2_frame_budgets(x, 16, 0.25)
    assert int(ks.argmax()) == 3
    assert bool((ks[3] > ks[[0, 1, 2, 4, 5, 6, 7]]).all())


def test_duplicate_frames_get_equal_budgets() -> None:
    frame = torch.randn(16, 8)
    x = torch.cat([frame, frame, frame])
    s = vidcom2_scores(x, 16, 0.5)
    assert torch.equal(s.ks, s.ks[:1].expand(3))
    assert torch.equal(s.vid_score[0], s.vid_score[2])


def test_official_rounding_overshoots_and_exact_count_fixes_it() -> None:
    x = _video(8, 16, 32)
    loose = vidcom2_keep_indices(x, 16, 0.01)  # min 1 per frame -> 8 tokens
    assert loose.numel() == 8
    exact = vidcom2_keep_indices(x, 16, 0.01, exact_count=True)
    assert exact.numel() == 1  # round(0.01 * 128)
    for r in (0.1, 0.15, 0.25, 0.33, 0.5, 1.0):
        keep = vidcom2_keep_indices(x, 16, r, exact_count=True)
        assert keep.numel() == round(r * 128)
        assert bool((keep[1:] > keep[:-1]).all())


def test_keep_ratio_one_official_drops_tokens_exact_keeps_all() -> None:
    x = _video(8, 16, 32, seed=3)
    assert vidcom2_keep_indices(x, 16, 1.0).numel() <= 128
    assert torch.equal(vidcom2_keep_indices(x, 16, 1.0, exact_count=True), torch.arange(128))


def test_reconcile_moves_fewest_tokens_toward_quota() -> None:
    ks = torch.tensor([5, 5, 5, 5])
    quotas = torch.tensor([5.4, 4.6, 5.49, 4.51], dtype=torch.float64)
    assert reconcile_budgets(ks, quotas, 16, 18).tolist() == [5, 4, 5, 4]
    assert reconcile_budgets(ks, quotas, 16, 21).tolist() == [5, 5, 6, 5]
    with pytest.raises(ConfigError, match="total"):
        reconcile_budgets(ks, quotas, 16, 65)


def test_select_by_budget_takes_lowest_scores_per_frame() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert select_by_budget(scores, torch.tensor([2, 1])).tolist() == [1, 3, 4]
    assert select_by_budget(scores, torch.tensor([0, 4])).tolist() == [4, 5, 6, 7]


def test_compressor_plan_matches_function_and_honours_given_budgets() -> None:
    x = _video(4, 16, 32, seed=5)
    comp = VidCom2Compressor(VidCom2Config(keep_ratio=0.25))
    plan = comp.select(VisualBatch(x.view(4, 16, 32)))
    assert torch.equal(plan.keep, vidcom2_keep_indices(x, 16, 0.25))
    assert int(plan.frame_counts.sum()) == plan.keep.numel()
    budgets = torch.tensor([1, 0, 16, 3])
    plan = comp.select(VisualBatch(x.view(4, 16, 32), frame_budgets=budgets))
    assert torch.bincount(plan.keep // 16, minlength=4).tolist() == [1, 0, 16, 3]


def test_bfloat16_runs_in_input_dtype() -> None:
    x = _video(4, 16, 32).bfloat16()
    s = vidcom2_scores(x, 16, 0.25)
    assert s.vid_score.dtype == torch.bfloat16
    assert vidcom2_keep_indices(x, 16, 0.25).numel() == int(s.ks.sum())


@pytest.mark.parametrize(
    ("options", "field"),
    [({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
     ({"keep_ratio": True}, "keep_ratio"), ({"temperature": 0}, "temperature"),
     ({"channel_ratio": 2.0}, "channel_ratio")],
)
def test_config_validation_names_the_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        COMPRESSORS.build("vidcom2", options)


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="tokens_per_frame"):
        vidcom2_keep_indices(torch.randn(30, 8), 16, 0.25)
    with pytest.raises(ConfigError, match="features"):
        vidcom2_keep_indices(torch.randn(4, 4, 8), 16, 0.25)
