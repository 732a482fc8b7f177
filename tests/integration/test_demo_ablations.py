"""`python -m demo --ablations` machinery at test sizes: two variants of the real loop (cloud-server
and two device-agents over mutual TLS) whose settings really differ on the wire, and the
ablations dict and report section the demo writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from demo import report
from demo.ablations import NAMES, run_ablations, variant
from demo.evaluation import Evaluator, eval_sets
from demo.loop import DEVICES, DemoConfig
from shared.models.zoo import ensure_zoo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_variant_changes_one_real_setting() -> None:
    cfg = DemoConfig.quick()
    done = {"uts": {"uploaded_samples": 6, "samples_seen": 24}}
    built = {n: variant(n, cfg, done) for n in NAMES}
    assert built["uts"].device == built["uts"].worker == built["uts"].trainer == {}
    assert built["random"].device["sampler"] == "random"
    assert built["random"].device["sampler_options"]["round_budget"] == 3  # 6/24 of 12
    assert built["no-vidcom2"].device["compressor"] == "none"
    assert built["dense-fp16"].worker == {"codec": "dense-fp16", "codec_options": {}}
    assert built["ce-only"].trainer["akd"] == {"kl_weight": 0.0, "feature_weight": 0.0}
    with pytest.raises(ValueError, match="uts"):
        variant("random", cfg, {})
    with pytest.raises(ValueError, match="expected one of"):
        variant("bogus", cfg, done)


def test_variant_trainer_options_merge_into_the_budgeted_defaults(tmp_path: Path) -> None:
    from demo.loop import merge_options, trainer_options

    cfg = DemoConfig()
    base = trainer_options(cfg, tmp_path / "teacher", tmp_path / "student", tmp_path)
    ce_only = merge_options(base, variant("ce-only", cfg, {}).trainer)
    assert ce_only["akd"] == {"delta_entries": cfg.delta_entries, "kl_weight": 0.0,
                              "feature_weight": 0.0}
    assert ce_only["steps"] == cfg.trainer_steps and base["akd"] == {
        "delta_entries": cfg.delta_entries}


def test_vidcom2_off_sends_more_bytes_per_sample(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = DemoConfig.quick(samples_per_round=8, eval_samples=4, probe_samples=4,
                           calibration_samples=4, trainer_steps=2)
    zoo = ensure_zoo(cfg.zoo)
    proc = json.loads((zoo.student / "cdca_processor.json").read_text())
    ev = Evaluator(zoo.teacher, zoo.student,
                   eval_sets(["source", *[d for _, d, _ in DEVICES]], cfg.eval_samples, 5,
                             int(proc["image_size"]), int(proc["num_frames"])))
    ab = run_ablations(tmp_path, cfg, zoo, ev, ev.student(),
                       ["vidcom2-all-tokens", "no-vidcom2"])
    assert ab["rounds"] == 1 and list(ab["variants"]) == ["vidcom2-all-tokens", "no-vidcom2"]
    assert ab["groups"]["visual token compression"] == ["vidcom2-all-tokens", "no-vidcom2"]
    on, off = ab["variants"]["vidcom2-all-tokens"], ab["variants"]["no-vidcom2"]
    for v in (on, off):
        assert v["cloud_exit_code"] == 0
        assert all(c["exit_code"] == 0 for cs in v["device_exit_codes"].values() for c in cs)
        assert set(v["devices"]) == {d for d, _, _ in DEVICES}
        for d in v["devices"].values():
            assert 0.0 <= d["acc_shifted"] <= 1.0 and 0.0 <= d["acc_source"] <= 1.0
            assert d["uploaded_samples"] > 0 and d["downlink_bytes_per_round"] > 0
    assert off["changes"]["device"]["compressor"] == "none"
    # every visual token vs the half VidCom2 keeps by default: the uplink per sample grows
    per_on = on["uplink_bytes"] / on["uploaded_samples"]
    per_off = off["uplink_bytes"] / off["uploaded_samples"]
    assert per_off > 1.6 * per_on
    md = "\n".join(report.ablation_section(ab, tmp_path))
    assert "| visual token compression | no-vidcom2 |" in md
    assert (tmp_path / "ablations.png").read_bytes()[:4] == b"\x89PNG"
