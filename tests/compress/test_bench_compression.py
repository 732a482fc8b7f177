"""Smoke test of bench/compression.py on a tiny scale run: JSON, PNG and the goal arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import compression


@pytest.mark.slow
def test_scale_part_writes_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = compression.main([
        "--parts", "scale", "--methods", "vidcom2_exact", "--scale-frames", "2",
        "--scale-hidden", "64", "--scale-layers", "1", "--scale-repeats", "1",
        "--max-new-tokens", "1", "--device", "cpu", "--out", str(tmp_path),
    ])
    assert rc == 0
    report = json.loads((tmp_path / "compression.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (tmp_path / "compression.png").stat().st_size > 1000
    runs = {(r["method"], r["keep_ratio"]): r for r in report["scale"]["runs"]}
    assert set(runs) == {("none", 1.0)} | {("vidcom2_exact", r) for r in compression.RATIOS}
    assert runs[("none", 1.0)]["visual_tokens_to_llm_per_sample"] == 2 * 196 + 1
    # exact count: round(0.25 * 392) frame tokens + the always-kept newline
    assert runs[("vidcom2_exact", 0.25)]["visual_tokens_to_llm_per_sample"] == 98 + 1
    assert runs[("vidcom2_exact", 0.15)]["kv_cache_bytes_per_sample"] < runs[("none", 1.0)][
        "kv_cache_bytes_per_sample"]
    assert 0 < runs[("vidcom2_exact", 0.15)]["prefill_peak_bytes"] < runs[("none", 1.0)][
        "prefill_peak_bytes"]
    g = report["goals"]["scale_prefill_speedup_25"]
    assert g["ideal_token_ratio"] == pytest.approx((393 + 33) / (99 + 33))
    assert g["met"] == (g["fraction_of_ideal"] >= 0.9)


def test_accuracy_goals_arithmetic() -> None:
    runs = [{"method": "none", "keep_ratio": 1.0, "accuracy": 0.8},
            {"method": "vidcom2", "keep_ratio": 0.25, "accuracy": 0.795},
            {"method": "random", "keep_ratio": 0.25, "accuracy": 0.7},
            {"method": "uniform", "keep_ratio": 0.25, "accuracy": 0.8},
            {"method": "sparsevlm", "keep_ratio": compression.SPARSEVLM_BUDGET, "accuracy": 0.76}]
    g = compression.goals({"accuracy": {"tasks": {"video": {"runs": runs}}}})
    assert g["video_vidcom2_25_keeps_99pct_accuracy"]["met"] is True
    official = g["video_sparsevlm_192_of_576_keeps_96pct_accuracy"]
    assert official["relative"] == pytest.approx(0.95) and official["met"] is False
    beats = g["video_vidcom2_25_beats_baselines"]
    assert beats["met"] is False
    assert beats["margin"]["random"] == pytest.approx(0.095)


def test_in_llm_methods_also_run_at_the_official_budget() -> None:
    grid = compression._grid(["vidcom2", "sparsevlm", "scene_oracle"])
    assert ("sparsevlm", 192 / 576) in grid and ("vidcom2", 192 / 576) not in grid
    assert ("scene_oracle", 192 / 576) in grid  # bounds what SparseVLM's budget can keep
    assert [r for m, r in grid if m == "sparsevlm"] == [1.0, 0.5, 192 / 576, 0.25, 0.15]


def test_prefill_peak_bytes_replays_cpu_allocations_in_order() -> None:
    def overlapping() -> torch.Tensor:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(2 << 20)  # 8 MiB, while a is alive
        return (a.sum() + b.sum()).detach()

    def sequential() -> None:
        for n in (1 << 20, 2 << 20):
            torch.ones(n).sum()  # each freed before the next

    cpu = torch.device("cpu")
    mib = 1 << 20
    assert 12 * mib <= compression.prefill_peak_bytes(cpu, overlapping) < 13 * mib
    assert 8 * mib <= compression.prefill_peak_bytes(cpu, sequential) < 9 * mib


def test_scene_oracle_keeps_object_tokens_first_and_cycles_through_the_batch() -> None:
    from device.compress.base import VisualBatch

    oracle = compression.SceneOracle(0.5)
    first = torch.zeros(8, dtype=torch.bool)
    first[[1, 4, 6]] = True
    second = torch.zeros(8, dtype=torch.bool)
    second[[0, 7]] = True
    oracle.set_scenes([first, second])
    batch = VisualBatch(torch.randn(2, 4, 3))  # 2 frames x 4 tokens
    plans = [oracle.select(batch) for _ in range(3)]  # items 1, 2, then 1 again (generate)
    for plan, shows in zip(plans, [first, second, first], strict=True):
        assert plan.keep.numel() == 4 and bool((plan.keep[1:] > plan.keep[:-1]).all())
        assert set(shows.nonzero().squeeze(1).tolist()) <= set(plan.keep.tolist())
        assert plan.frame_counts is not None and int(plan.frame_counts.sum()) == 4
    with pytest.raises(compression.ConfigError, match="no scenes"):
        compression.SceneOracle(0.5).select(batch)


def test_object_masks_mark_the_tokens_of_cells_with_objects() -> None:
    from shared.media import procedural as P
    from shared.models.processor import VLMProcessor
    from shared.models.zoo import ZOOS, make_tokenizer_ids

    tok, _ = make_tokenizer_ids()
    proc = VLMProcessor.from_spec(ZOOS["default"].spec("teacher"), tok, "question_both")
    samples = P.batch("source", 4, seed=3, media_kind="video")
    masks = compression.object_masks(samples, proc)
    assert len(masks) == len(samples)
    for mask in masks:
        assert mask.shape == (proc.num_visual_tokens("video"),)
        assert 0 < int(mask.sum()) < mask.numel() - 1  # some cells show objects, the newline none
        assert not bool(mask[-1])
