"""bench/adaptation_ceiling.py end to end on the test zoo, and its goal arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import adaptation_ceiling as ceiling
from shared.models.zoo import ensure_zoo


@pytest.mark.slow  # ~15 s: the test zoo, two full fine-tunes, two LoRA rounds, evaluations
def test_bench_runs_on_the_test_zoo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    zoo = ensure_zoo("test", cache_dir=tmp_path / "zoo", evaluate_after=False)
    rc = ceiling.main(["--zoo", "test", "--zoo-dir", str(zoo.root), "--eval-n", "4",
                       "--steps", "2", "--full-ft-sizes", "4", "6", "--lora-uploads", "4",
                       "--replay", "4", "--threads", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "ceiling.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (tmp_path / "out" / "ceiling.png").stat().st_size > 1000
    assert set(report["accuracy"]) == {"before", "teacher", "full_ft_true_4", "full_ft_true_6",
                                       "lora_teacher_4", "lora_true_4"}
    assert all(set(v) == {"low_light", "source"} for v in report["accuracy"].values())
    g = report["goals"]["gap_closed_80pct"]
    assert set(g["closed_share"]) == set(report["accuracy"]) - {"before", "teacher"}


def test_goal_counts_the_updates_that_reach_80pct_of_the_gap() -> None:
    def acc(x: float, src: float = 0.9) -> dict:
        return {"low_light": {"acc": x}, "source": {"acc": src}}

    report = {"domain": "low_light", "accuracy": {
        "before": acc(0.5), "teacher": acc(0.9), "full_ft_true_2000": acc(0.85, 0.92),
        "lora_teacher_2000": acc(0.74, 0.85)}}
    g = ceiling.goals(report)["gap_closed_80pct"]
    assert g["target_acc"] == pytest.approx(0.82)
    assert g["reaching_target"] == ["full_ft_true_2000"]
    assert g["closed_share"]["lora_teacher_2000"] == pytest.approx(0.6)
    assert g["source_change_pt"]["lora_teacher_2000"] == pytest.approx(-5.0)
