"""Compressor registry and the random / uniform / none baselines."""

from __future__ import annotations

import pytest
import torch

from device.compress import COMPRESSORS, Stage, TokenCompressor, VisualBatch
from device.compress.baselines import even_budgets
from shared.errors import ConfigError


def test_registry_names_and_errors() -> None:
    assert {"none", "random", "uniform", "vidcom2"} <= set(COMPRESSORS.names())
    with pytest.raises(ConfigError, match="unknown token compressor"):
        COMPRESSORS.build("fastv")
    with pytest.raises(ConfigError, match="keep_ratio"):
        COMPRESSORS.build("uniform", {"keep_ratio": 2})
    with pytest.raises(ConfigError, match="unknown option"):
        COMPRESSORS.build("random", {"ratio": 0.5})
    with pytest.raises(KeyError):
        COMPRESSORS.register("vidcom2", object, object)


@pytest.mark.parametrize("name", ["none", "random", "uniform", "vidcom2"])
def test_every_compressor_returns_a_valid_plan(name: str) -> None:
    comp = COMPRESSORS.build(name, {} if name == "none" else {"keep_ratio": 0.3})
    assert isinstance(comp, TokenCompressor)
    assert comp.stage is Stage.PRE_LLM
    plan = comp.select(VisualBatch(torch.randn(5, 12, 16), grid_hw=(3, 4)))
    keep = plan.keep
    assert keep.dtype == torch.int64
    assert bool((keep[1:] > keep[:-1]).all()) and int(keep[0]) >= 0 and int(keep[-1]) < 60
    assert int(plan.frame_counts.sum()) == keep.numel()
    expected = 60 if name == "none" else round(0.3 * 60)
    if name != "vidcom2":
        assert keep.numel() == expected


def test_random_is_reproducible_per_seed_and_varies_between_calls() -> None:
    batch = VisualBatch(torch.randn(2, 50, 4))
    a = COMPRESSORS.build("random", {"keep_ratio": 0.2, "seed": 7})
    b = COMPRESSORS.build("random", {"keep_ratio": 0.2, "seed": 7})
    first = a.select(batch).keep
    assert torch.equal(first, b.select(batch).keep)
    assert not torch.equal(first, a.select(batch).keep)


def test_uniform_spreads_over_each_frame() -> None:
    plan = COMPRESSORS.build("uniform", {"keep_ratio": 0.25}).select(
        VisualBatch(torch.randn(2, 16, 4))
    )
    assert plan.keep.tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert even_budgets(3, 10, 0.5).tolist() == [5, 5, 5]
    assert int(even_budgets(3, 10, 0.55).sum()) == 16


def test_visual_batch_validates() -> None:
    with pytest.raises(ConfigError, match="embeds"):
        VisualBatch(torch.randn(4, 8))
    with pytest.raises(ConfigError, match="grid_hw"):
        VisualBatch(torch.randn(1, 8, 2), grid_hw=(3, 3))
    with pytest.raises(ConfigError, match="frame_budgets"):
        VisualBatch(torch.randn(2, 8, 2), frame_budgets=torch.tensor([9, 1]))
