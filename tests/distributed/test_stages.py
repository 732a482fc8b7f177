"""Labelling and distillation as separate stages: the distill stage needs no teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.distributed import LaunchEnv, Runtime, run_job
from cloud.labels import SqliteLabelCache, checkpoint_hash
from shared.errors import ConfigError
from tests.distributed import jobs


def test_label_stage_then_teacherless_distill_stage(tmp_path: Path) -> None:
    jobs.single_process_env()
    jobs.make_inputs(tmp_path, generated=3, forced=1, teacher_layers=2)
    rt = Runtime(LaunchEnv())
    labelled = run_job(jobs.spec(tmp_path, "out", "labels", label_batch_size=2), rt, "label")
    assert (labelled.labels.hits, labelled.labels.labelled_here) == (0, 4)
    assert labelled.metrics == {} and not (tmp_path / "out").exists()
    cache = SqliteLabelCache(tmp_path / "labels")
    assert len(cache) == 4
    cache.close()

    # the distill stage elsewhere: only the teacher's hash, no teacher checkpoint
    teacherless = jobs.spec(tmp_path, "out", "labels", teacher_dir=None,
                            teacher_hash=checkpoint_hash(tmp_path / "teacher"), steps=2)
    out = run_job(teacherless, rt, "distill")
    assert out.metrics["steps"] == 2.0 and (tmp_path / "out" / "adapter.safetensors").is_file()

    other = jobs.spec(tmp_path, "out", "labels", teacher_dir=None, teacher_hash="another")
    with pytest.raises(ConfigError, match="labels missing"):
        run_job(other, rt, "distill")
    with pytest.raises(ConfigError, match="teacher_dir"):
        run_job(other, rt, "all")
