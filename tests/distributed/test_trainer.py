"""The worker-facing AKD job trainer: uploads in, adapter out, labels reused across rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cloud.distributed.trainer import AkdJobConfig, AkdJobTrainer
from shared.errors import WireFormatError
from shared.types import UploadSample, VisualTokens
from tests.distill import tiny_pair as tp
from tests.distributed import jobs


class _Ctx:
    """In-memory JobContext."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.saved: tuple[int, dict[str, torch.Tensor]] | None = None

    def restore(self):
        return self.saved

    def checkpoint(self, step, tensors) -> None:
        self.saved = (step, tensors)


def _uploads(n: int) -> list[UploadSample]:
    out = []
    for s in tp.samples(n, seed=2):
        v = s.visual_tokens.numpy().astype(np.float16)  # (K, D) as a device uploads them
        out.append(UploadSample(s.sample_id, "video", s.question, "red", 0.2, tokens=VisualTokens(
            v, s.positions.numpy(), s.grid, "projected")))
    return out


def test_rounds_run_as_jobs_and_reuse_teacher_labels(tmp_path: Path) -> None:
    jobs.single_process_env()
    jobs.make_inputs(tmp_path, generated=1, forced=0)
    trainer = AkdJobTrainer(AkdJobConfig(
        student_dir=str(tmp_path / "student"), teacher_dir=str(tmp_path / "teacher"),
        label_cache_dir=str(tmp_path / "labels"), work_dir=str(tmp_path / "jobs"), steps=3,
        batch_size=2, lr=5e-3, lora={"rank": 4, "alpha": 8}, labelling={"max_new_tokens": 4}))
    start = trainer.initial_adapter()
    assert start and all("lora_" in k for k in start)
    uploads = _uploads(4)
    for u in uploads:
        trainer.check_sample(u)
    ctx1 = _Ctx("job-1")
    first = trainer.train(start, uploads, ctx1)
    assert first.adapter.keys() == start.keys()
    assert any(not torch.equal(first.adapter[k], start[k]) for k in start)
    assert first.metrics["label_hit_rate"] == 0.0 and ctx1.saved is not None
    second = trainer.train(first.adapter, uploads, _Ctx("job-2"))  # a later round, same uploads
    assert second.metrics["label_hit_rate"] == 1.0
    assert not (tmp_path / "jobs" / "job-1").exists()
    # a retry of a finished job returns its checkpoint without running again
    again = trainer.train(start, uploads, ctx1)
    assert again.metrics == {"restored": 1.0}
    assert all(torch.equal(again.adapter[k], first.adapter[k]) for k in start)

    bad = UploadSample("x", "video", "q", "", 0.1, tokens=VisualTokens(
        np.zeros((2, 7), np.float16), np.arange(2), (1, 1, 2), "projected"))
    with pytest.raises(WireFormatError, match="width"):
        trainer.check_sample(bad)
    with pytest.raises(WireFormatError, match="tokens"):
        trainer.check_sample(UploadSample("y", "video", "q", "", 0.1))
