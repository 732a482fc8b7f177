"""The test zoo: trains in seconds, saves standard checkpoints that plain from_pretrained loads,
and teacher/student share the visual weights so device-side tokens are valid teacher input."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

from shared.errors import ConfigError, IntegrityError
from shared.media import procedural as P
from shared.models import evaluate, generate_answers, load_vlm, visual_hash
from shared.models.architectures import as_encoder_outputs, encode_visual, pixel_keys, text_keys
from shared.models.pretrain import StageSchedule
from shared.models.zoo import DATA_VERSION, ZooConfig, ensure_zoo, zoo_config


def test_checkpoints_load_with_plain_from_pretrained(test_zoo) -> None:
    for path in (test_zoo.teacher, test_zoo.student):
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
        meta = json.loads((path / "cdca_meta.json").read_text())
        assert model.config.vision_sha256 == meta["vision_sha256"] == visual_hash(model)


def test_teacher_and_student_share_visual_weights_and_differ_in_size(test_zoo) -> None:
    t, s = load_vlm(test_zoo.teacher), load_vlm(test_zoo.student)
    assert t.meta["vision_sha256"] == s.meta["vision_sha256"]
    assert t.meta["role"] == "teacher" and s.meta["trained_domains"] == ["source"]
    assert s.meta["language_model_params"] * 2 < t.meta["language_model_params"]
    assert t.model.config.text_config.hidden_size == s.model.config.text_config.hidden_size
    # tokens encoded by the STUDENT (as a device would) drive the TEACHER exactly
    samples = P.batch("source", 2, seed=9)
    inputs = t.processor(samples, answers=True)
    direct = t.model(**inputs).logits
    feats = encode_visual(s.model, pixel_keys(inputs))
    via = t.model(**text_keys(inputs), mm_encoder_outputs=as_encoder_outputs(t.model, feats))
    assert torch.equal(direct, via.logits)


def test_ensure_zoo_reuses_the_cache(test_zoo, tmp_path: Path) -> None:
    again = ensure_zoo("test", cache_dir=test_zoo.root.parent)
    assert again == test_zoo
    report = json.loads(test_zoo.report.read_text())
    assert report["zoo_key"] == zoo_config("test").key()
    assert report["train_seconds"] < 60
    with pytest.raises(ConfigError, match="unknown zoo"):
        ensure_zoo("nope", cache_dir=tmp_path)


def test_evaluate_reports_domains_and_qtypes(test_zoo) -> None:
    loaded = load_vlm(test_zoo.student)
    samples = P.batch("source", 3, seed=1) + P.batch("blur", 2, seed=1, media_kind="image")
    preds = generate_answers(loaded, samples, max_new_tokens=2)
    assert len(preds) == 5 and all(isinstance(p, str) for p in preds)
    res = evaluate(loaded, samples)
    assert res["overall"]["n"] == 5
    assert set(res["per_domain"]) == {"source", "blur"}
    assert res["per_domain"]["source"]["n"] == 3
    assert all(k.split("/")[0] in ("video", "image") for k in res["per_qtype"])


def test_tampered_visual_weights_are_detected(test_zoo, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    dst = tmp_path / "student"
    shutil.copytree(test_zoo.student, dst)
    state = load_file(dst / "model.safetensors")
    key = next(k for k in state if "multi_modal_projector" in k)
    state[key] = state[key] + 1
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IntegrityError, match="hash"):
        load_vlm(dst)


def test_qwen2_vl_zoo_round_trip(tmp_path: Path) -> None:
    paths = ensure_zoo("test-qwen2vl", cache_dir=tmp_path, evaluate_after=False)
    model = Qwen2VLForConditionalGeneration.from_pretrained(paths.teacher)
    assert model.config.vision_sha256 == visual_hash(model)
    loaded = load_vlm(paths.student)
    assert loaded.meta["vision_sha256"] == model.config.vision_sha256
    preds = generate_answers(loaded, P.batch("clutter", 2, seed=0), max_new_tokens=2)
    assert len(preds) == 2


def test_zoo_config_validation() -> None:
    with pytest.raises(ConfigError, match="smaller"):
        ZooConfig(student_layers=6, student_intermediate=512)
    with pytest.raises(ConfigError, match="architecture"):
        ZooConfig(architecture="gpt2")
    with pytest.raises(ConfigError, match="token_drop"):
        ZooConfig(token_drop=1.5)
    with pytest.raises(ConfigError, match="1-D RoPE"):
        ZooConfig(architecture="qwen2_vl", token_drop=0.5)
    with pytest.raises(ConfigError, match="`precision` must be one of .*'fp16'"):
        StageSchedule(10, 1e-3, 8, precision="fp16")


def test_cli_eval_writes_json(test_zoo, tmp_path: Path) -> None:
    from cloud.zoo.__main__ import main

    out = tmp_path / "eval.json"
    rc = main(["--threads", "1", "eval", "--zoo", "test", "--cache-dir",
               str(test_zoo.root.parent), "--n", "2", "--domains", "source,clutter",
               "--media", "video", "--first-frame", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"teacher/video", "teacher/video_first_frame", "student/video",
                        "student/video_first_frame"}
    assert res["student/video"]["overall"]["n"] == 4


def test_committed_default_zoo_matches_its_config_and_loads() -> None:
    from shared.models.zoo import COMMITTED

    root = COMMITTED / "default"
    if not (root / "teacher" / "config.json").is_file():
        pytest.skip("no committed default zoo")
    paths = ensure_zoo("default")  # must not train: the committed copy matches the config key
    assert paths.root == root
    t = LlavaOnevisionForConditionalGeneration.from_pretrained(paths.teacher)
    s = LlavaOnevisionForConditionalGeneration.from_pretrained(paths.student)
    assert visual_hash(t) == visual_hash(s) == t.config.vision_sha256
    n_t = sum(p.numel() for p in t.model.language_model.parameters())
    n_s = sum(p.numel() for p in s.model.language_model.parameters())
    assert n_s * 3 < n_t


def _key_without_precision(cfg: ZooConfig) -> str:
    """The key as computed before `StageSchedule.precision` existed."""
    config = cfg.to_dict()
    for stage in ("vision", "teacher", "student"):
        del config[stage]["precision"]
    payload = json.dumps({"config": config, "data": DATA_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_precision_enters_the_zoo_key_only_away_from_fp32() -> None:
    # zoos trained before `StageSchedule.precision` existed keep their keys; bf16 stages train
    # different weights and must not find an fp32 zoo's cache
    fp32, bf16 = zoo_config("default-fp32"), zoo_config("default")
    assert fp32.teacher.precision == "fp32" and bf16.teacher.precision == "bf16"
    assert replace(bf16, teacher=replace(bf16.teacher, precision="fp32")) == fp32
    assert fp32.key() == _key_without_precision(fp32) == "02804e2efd188775"
    assert bf16.key() != _key_without_precision(bf16) == fp32.key()
    assert bf16.key() == "20924efefe69e9d8"  # the committed zoo/default
