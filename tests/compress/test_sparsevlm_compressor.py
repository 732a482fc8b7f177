"""SparseVLM as a registered TokenCompressor, its config and its budget arithmetic."""

from __future__ import annotations

import pytest
import torch

from device.compress import COMPRESSORS, Stage, VisualBatch
from device.compress.sparsevlm import (
    OFFICIAL_TABLES,
    SparseVLMConfig,
    equivalent_tokens,
    fit_targets,
    pruning_layers,
    stage_counts,
)
from device.compress.vidcom2 import vidcom2_frame_budgets
from shared.errors import ConfigError


def test_official_192_accounting() -> None:
    """The spec's worked example: 576 -> 309 / 204 / 113 after layers 2 / 6 / 15 = 192.03."""
    counts = stage_counts(576, OFFICIAL_TABLES[192])
    assert counts == [(300, 9), (200, 4), (110, 3)]
    after = [k + c for k, c in counts]
    assert equivalent_tokens(576, 32, (2, 6, 15), after) == 192.03125
    assert pruning_layers(32, SparseVLMConfig().layer_fractions) == (2, 6, 15)
    assert pruning_layers(8, SparseVLMConfig().layer_fractions) == (0, 1, 3)
    assert pruning_layers(2, SparseVLMConfig().layer_fractions) == (0,)  # not the last layer
    assert pruning_layers(1, SparseVLMConfig().layer_fractions) == ()


@pytest.mark.parametrize("budget", sorted(OFFICIAL_TABLES))
def test_fitted_targets_hit_the_equivalent_budget(budget: int) -> None:
    for visual, depth in ((576, 32), (136, 8), (1569, 24)):
        layers = pruning_layers(depth, SparseVLMConfig().layer_fractions)
        targets = fit_targets(visual, depth, layers, budget / 576)
        after = [k + c for k, c in stage_counts(visual, targets)]
        got = equivalent_tokens(visual, depth, layers, after)
        assert abs(got - budget / 576 * visual) <= max(2.0, 0.02 * visual), (visual, targets)


def test_keep_ratio_one_prunes_nothing() -> None:
    layers = pruning_layers(4, SparseVLMConfig().layer_fractions)
    targets = fit_targets(257, 4, layers, 1.0)
    assert stage_counts(257, targets) == [(257, 0)] * len(layers)


def test_registry_builds_in_llm_compressors() -> None:
    comp = COMPRESSORS.build("sparsevlm", {"keep_ratio": 0.25})
    assert comp.stage is Stage.IN_LLM
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 8, 16, generator=g)  # (F, N, D)
    attn = torch.rand(5, 16, generator=g)  # (Q, F*N)
    plan = comp.select(VisualBatch(embeds, text_attn=attn))
    assert plan.keep.tolist() == sorted(torch.topk(attn.mean(0), 4).indices.tolist())
    assert plan.recycled is not None and plan.recycled.shape == (1, 16)  # 12 pruned -> 4 -> 1
    assert int(plan.frame_counts.sum()) == 4

    both = COMPRESSORS.build("vidcom2+sparsevlm", {"keep_ratio": 0.25})
    plan = both.select(VisualBatch(embeds, text_attn=attn))
    budgets = vidcom2_frame_budgets(embeds.reshape(16, 16), 8, 0.25)
    assert plan.frame_counts.tolist() == budgets.tolist()
    for f in range(2):  # inside each frame: the top tokens by rater attention
        mine = plan.keep[(plan.keep // 8) == f]
        top = torch.topk(attn.mean(0)[f * 8:(f + 1) * 8], int(budgets[f])).indices + f * 8
        assert sorted(mine.tolist()) == sorted(top.tolist())


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match="frame_budgets"):
        COMPRESSORS.build("sparsevlm", {"frame_budgets": "fastv"})
    with pytest.raises(ConfigError, match="recycle_ratio"):
        SparseVLMConfig(recycle_ratio=0)
    with pytest.raises(ConfigError, match="text_attn"):
        COMPRESSORS.build("sparsevlm").select(VisualBatch(torch.zeros(1, 4, 8)))
