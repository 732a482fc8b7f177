"""Job spec files, samples files and the launcher environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cloud.distributed import DistillJobSpec, LaunchEnv, Runtime, load_samples, save_samples
from cloud.distributed.run import main
from shared.errors import ConfigError
from tests.distill import tiny_pair as tp

BASE = dict(student_dir="s", samples_file="x.safetensors", output_dir="o",
            label_cache_dir="c", teacher_dir="t")


def test_spec_round_trips_and_validates(tmp_path: Path) -> None:
    spec = DistillJobSpec(**BASE, sample_ids=("a", "b"), akd={"temperature": 1.0},
                          lora={"rank": 2})
    spec.to_json(tmp_path / "job.json")
    assert DistillJobSpec.from_json(tmp_path / "job.json") == spec
    assert spec.akd_config().temperature == 1.0 and spec.akd_config().seed == 0
    cases = [({"teacher_sharding": "zero3"}, "teacher_sharding"), ({"backend": "mpi"}, "backend"),
             ({"steps": 0}, "steps"), ({"akd": {"lr": 1.0}}, "top-level"),
             ({"lora": {"rnk": 2}}, "lora"), ({"teacher_dir": None}, "teacher_hash"),
             ({"labelling": {"max_new_tokens": 0}}, "max_new_tokens")]
    for bad, match in cases:
        with pytest.raises(ConfigError, match=match):
            DistillJobSpec(**{**BASE, **bad})
    (tmp_path / "bad.json").write_text(json.dumps({**BASE, "stepz": 3}))
    with pytest.raises(ConfigError, match="stepz"):
        DistillJobSpec.from_json(tmp_path / "bad.json")
    assert main(["--job", str(tmp_path / "bad.json")]) == 2


def test_samples_file_round_trip_without_pickle(tmp_path: Path) -> None:
    samples = tp.samples(3, seed=1) + tp.samples(1, seed=2, with_reference=True)
    save_samples(samples, tmp_path / "s.safetensors")
    back = load_samples(tmp_path / "s.safetensors")
    for a, b in zip(samples, back, strict=True):
        assert (a.question, a.grid, a.reference_answer, a.sample_id) == (
            b.question, b.grid, b.reference_answer, b.sample_id)
        assert torch.equal(a.visual_tokens, b.visual_tokens)
        assert torch.equal(a.positions, b.positions)
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="not a samples file"):
        load_samples(tmp_path / "plain.safetensors")


def test_launch_env_and_single_process_runtime() -> None:
    env = LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    assert LaunchEnv.from_environ({}) == LaunchEnv()
    with pytest.raises(ConfigError, match="rank"):
        LaunchEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})
    rt = Runtime(LaunchEnv())
    assert rt.backend in ("gloo", "nccl") and rt.world_size == 1
    assert rt.data_parallel().world_size == 1
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="nccl"):
            Runtime(LaunchEnv(), backend="nccl")
