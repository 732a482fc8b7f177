"""Smoke test of bench/akd.py on the test zoo (JSON, PNG, every part present) and its goals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import akd
from shared.models.zoo import ensure_zoo


@pytest.mark.slow  # ~11 s: builds the test zoo, three rounds, a dozen evaluations
def test_bench_runs_on_the_test_zoo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    zoo = ensure_zoo("test", cache_dir=tmp_path / "zoo", evaluate_after=False)
    rc = akd.main(["--zoo-dir", str(zoo.root), "--uploads", "6", "--eval-n", "6",
                   "--steps", "2", "--batch-size", "4", "--shares", "0.5", "0.99",
                   "--bits", "8", "4", "--budgets", "0.05", "--timing-repeats", "2",
                   "--budget-entries", "30", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "akd.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert (tmp_path / "out" / "akd.png").stat().st_size > 1000
    assert set(report["accuracy"]) == {"before", "akd", "ce_only", "akd_no_replay", "teacher",
                                       "akd_dwc", "akd_lora_b_only", "akd_budgeted",
                                       "akd_budgeted_dwc"}
    assert set(report["accuracy"]["akd"]) == {"low_light", "source"}
    assert report["rounds"]["akd"]["replay_per_batch"] == 1.0  # round(4 * 0.25)
    assert report["rounds"]["akd_no_replay"]["replay_per_batch"] == 0.0
    dl = report["downlink"]
    assert len(dl["curve"]) == 6  # 2 shares x 2 widths + 1 budget x 2 widths
    assert all(p["payload_bytes"] < dl["dense_fp16_adapter_bytes"] for p in dl["curve"])
    budgeted = [p for p in dl["curve"] if "budget_bytes" in p]
    assert len(budgeted) == 2
    assert all(p["payload_bytes"] <= p["budget_bytes"] for p in budgeted)
    b = dl["budgeted_round"]
    assert b["delta_entries"] == 30 and 0 < b["kept"] <= 30
    assert b["payload_bytes"] <= b["budget_bytes"]
    assert dl["dense_fp16_adapter_raw_bytes"] == 2 * dl["adapter_params"]
    assert dl["student_fp16_bytes"] > dl["dense_fp16_adapter_bytes"]
    t = report["timing"]
    assert t["ratio"] == pytest.approx(t["akd_step_s"] / t["reference_s"])
    g = report["goals"]
    assert g["akd_step_le_1p25x_teacher_fwd_plus_student_fwd_bwd"]["met"] == (t["ratio"] <= 1.25)
    gap = g["budgeted_round_gap"]
    assert gap["from_freezing_a_pt"] + gap["from_the_entry_budget_pt"] == pytest.approx(
        gap["dense_pt"] - gap["budgeted_pt"])


def _report(points: list[tuple[float, float]], ratio: float) -> dict:
    acc = {"acc": 0.6, "n": 200, "ci95": 0.068}
    return {
        "domain": "low_light",
        "accuracy": {"before": {"low_light": {**acc, "acc": 0.4}},
                     "akd": {"low_light": acc}, "teacher": {"low_light": {**acc, "acc": 0.8}}},
        "downlink": {"curve": [{"bits": 8, "energy_share": 0.9, "payload_bytes": 1000 * s,
                                "over_dense_fp16": s, "loss_vs_exact": loss,
                                "answers_agree_with_exact": 0.9} for s, loss in points]},
        "timing": {"ratio": ratio, "akd_step_s": ratio, "reference_s": 1.0},
    }


def test_goals_arithmetic() -> None:
    g = akd.goals(_report([(0.05, 0.0), (0.015, 0.004), (0.01, 0.02)], 1.3))
    dwc = g["dwc_le_2pct_of_dense_fp16_with_le_0p5pt_loss"]
    assert dwc["met"] is True and dwc["status"] == "pass"
    assert dwc["best_point"]["over_dense_fp16"] == 0.015
    assert dwc["smallest_point"]["over_dense_fp16"] == 0.01
    assert [p["over_dense_fp16"] for p in dwc["points_within_2pct"]] == [0.015, 0.01]
    assert dwc["gain_resolvable"] is True and dwc["exact_delta_gain_pt"] == pytest.approx(20)
    assert g["akd_step_le_1p25x_teacher_fwd_plus_student_fwd_bwd"]["met"] is False
    assert g["zoo_quality"]["teacher_beats_student"] is True
    g = akd.goals(_report([(0.05, 0.0), (0.01, 0.006)], 1.2))
    assert g["dwc_le_2pct_of_dense_fp16_with_le_0p5pt_loss"]["status"] == "fail"
    # a round whose exact delta moves accuracy less than the noise shows nothing
    weak = _report([(0.01, 0.0)], 1.2)
    weak["accuracy"]["before"]["low_light"]["acc"] = 0.59
    dwc = akd.goals(weak)["dwc_le_2pct_of_dense_fp16_with_le_0p5pt_loss"]
    assert (dwc["met"], dwc["met_by_letter"], dwc["status"]) == (False, True, "not shown")
    assert g["akd_step_le_1p25x_teacher_fwd_plus_student_fwd_bwd"]["met"] is True
    # the budgeted round counts, with its loss against the dense round's exact delta
    rep = _report([(0.05, 0.0)], 1.2)
    rep["downlink"]["budgeted_round"] = {"bits": 8, "energy_share": 1.0, "delta_entries": 300,
                                         "payload_bytes": 19, "over_dense_fp16": 0.019,
                                         "loss_vs_exact": 0.003, "answers_agree_with_exact": 0.8}
    dwc = akd.goals(rep)["dwc_le_2pct_of_dense_fp16_with_le_0p5pt_loss"]
    assert dwc["status"] == "pass" and dwc["best_point"]["delta_entries"] == 300
