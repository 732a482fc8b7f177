"""Teacher label cache: keys, safetensors round trip, concurrent writers, reuse across jobs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cloud.distill import label
from cloud.distributed import LaunchEnv, Runtime, label_stage
from cloud.labels import (
    LabellingConfig,
    SqliteLabelCache,
    cached_labels,
    checkpoint_hash,
    label_key,
    prompt_digest,
)
from shared.errors import ConfigError
from tests.distill import tiny_pair as tp


@pytest.fixture(scope="module")
def teacher():
    torch.set_num_threads(1)
    return tp.vlm(layers=2, seed=1)


def test_key_depends_on_teacher_content_options_and_prompt_not_on_id() -> None:
    s = tp.samples(2, seed=2)
    cfg = LabellingConfig(max_new_tokens=5)
    k = label_key("t1", s[0], cfg, "p")
    assert k == label_key("t1", dataclasses.replace(s[0], sample_id="other"), cfg, "p")
    assert k != label_key("t2", s[0], cfg, "p")
    assert k != label_key("t1", s[1], cfg, "p")
    assert k != label_key("t1", s[0], LabellingConfig(max_new_tokens=6), "p")
    assert k != label_key("t1", s[0], cfg, "q")
    nudged = dataclasses.replace(s[0], visual_tokens=s[0].visual_tokens + 1e-6)
    assert k != label_key("t1", nudged, cfg, "p")
    assert prompt_digest(tp.formatter()) == prompt_digest(tp.formatter())


def test_checkpoint_hash_changes_with_weights(tmp_path: Path) -> None:
    tp.vlm(1, seed=1).save_pretrained(tmp_path / "a")
    tp.vlm(1, seed=1).save_pretrained(tmp_path / "b")
    tp.vlm(1, seed=2).save_pretrained(tmp_path / "c")
    assert checkpoint_hash(tmp_path / "a") == checkpoint_hash(tmp_path / "b")
    assert checkpoint_hash(tmp_path / "a") != checkpoint_hash(tmp_path / "c")
    with pytest.raises(ConfigError, match="no weight"):
        checkpoint_hash(tmp_path / "empty")


def test_round_trip_first_writer_wins_and_no_orphans(tmp_path: Path, teacher) -> None:
    fmt = tp.formatter()
    s = tp.samples(2, seed=3)
    labs = label(teacher, s, fmt, max_new_tokens=4)
    a, b = SqliteLabelCache(tmp_path), SqliteLabelCache(tmp_path)  # two processes' handles
    a.put("k", labs[0])
    b.put("k", labs[1])  # same key again: ignored, its file removed
    got = b.get("k")
    assert got is not None and torch.equal(got.answer_ids, labs[0].answer_ids)
    assert torch.equal(got.logits, labs[0].logits) and torch.equal(got.hidden, labs[0].hidden)
    assert a.get("missing") is None and not a.contains("missing") and a.contains("k")
    assert len(list((tmp_path / "files").iterdir())) == len(a) == 1
    assert b"pickle" not in (next((tmp_path / "files").iterdir())).read_bytes()[:200]
    a.close()
    b.close()


def test_second_job_on_the_same_uploads_hits_and_skips_the_teacher(tmp_path: Path,
                                                                   teacher) -> None:
    fmt = tp.formatter()
    samples = tp.samples(4, seed=4) + tp.samples(2, seed=6, with_reference=True)
    cfg = LabellingConfig(max_new_tokens=4)
    cache = SqliteLabelCache(tmp_path)
    calls: list[int] = []

    def counting(batch):
        calls.append(len(batch))
        return label(teacher, batch, fmt, max_new_tokens=4)

    first, st1 = cached_labels(teacher, samples, fmt, cache, "t", cfg, labeller=counting,
                               batch_size=4)
    assert (st1.hits, st1.misses, calls) == (0, 6, [4, 2])
    again, st2 = cached_labels(None, samples, fmt, cache, "t", cfg, labeller=counting)
    assert st2.hit_rate == 1.0 and calls == [4, 2]  # the teacher did not run again
    fresh = label(teacher, samples, fmt, max_new_tokens=4)
    for x, y, z in zip(first, again, fresh, strict=True):
        assert torch.equal(x.answer_ids, z.answer_ids) and torch.equal(y.logits, z.logits)
    # another teacher (hash) misses everything and needs a teacher
    with pytest.raises(ConfigError, match="not cached"):
        cached_labels(None, samples, fmt, cache, "other", cfg)
    cache.close()


def test_label_stage_alone_labels_only_misses(tmp_path: Path, teacher) -> None:
    fmt = tp.formatter()
    samples = tp.samples(3, seed=8)
    cfg = LabellingConfig(max_new_tokens=3)
    cache = SqliteLabelCache(tmp_path)
    rt = Runtime(LaunchEnv())
    r1 = label_stage(teacher, samples[:2], fmt, cache, "t", cfg, rt, batch_size=1)
    r2 = label_stage(teacher, samples, fmt, cache, "t", cfg, rt)
    assert (r1.hits, r1.labelled_here) == (0, 2)
    assert (r2.hits, r2.labelled_here, round(r2.hit_rate, 3)) == (2, 1, 0.667)
    with pytest.raises(ConfigError, match="teacher_dir"):
        label_stage(None, tp.samples(1, seed=9), fmt, cache, "t", cfg, rt)
    cache.close()
    assert json.dumps(dataclasses.asdict(r2))
