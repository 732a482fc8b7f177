"""The worker's AKD trainer on a job hand-off: uploads -> job spec -> launcher -> new adapter.

Implements `cloud.trainers.Trainer`, so the distillation worker can run AKD rounds either in its
own process (`nproc_per_node` 1, the embedded default) or as a `torchrun` job, through the same
job spec; teacher labels are reused from the label cache across rounds and retries.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import safetensors.torch
import torch
from peft import get_peft_model_state_dict
from torch import nn

from cloud.distill import DistillSample, attach_lora
from cloud.distill.base import FEATURE_SPACES
from cloud.distributed.job import load_checkpoint
from cloud.distributed.launch import InProcessLauncher, Launcher, TorchrunLauncher, export_job
from cloud.distributed.spec import DistillJobSpec
from cloud.labels import checkpoint_hash
from cloud.trainers.base import JobContext, StateDict, TrainResult
from shared.errors import ConfigError, WireFormatError
from shared.types import UploadSample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AkdJobConfig:
    """Options of the AKD job trainer (checkpoints, where jobs run, hyper-parameters)."""

    student_dir: str
    teacher_dir: str
    label_cache_dir: str
    """Teacher label cache shared by every round (usually inside the store's data dir)."""
    work_dir: str
    """Per-job inputs and outputs go to <work_dir>/<job_id>/."""
    nproc_per_node: int = 1
    """1: run in the worker's process; N > 1: a torchrun job with N ranks."""
    threads_per_rank: int = 1
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    akd: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    labelling: dict[str, Any] = field(default_factory=dict)
    teacher_sharding: str = "replicate"
    backend: str = "auto"
    keep_job_dirs: bool = False
    """Keep <work_dir>/<job_id>/ after a round (for debugging)."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"`nproc_per_node` must be >= 1, got {self.nproc_per_node}")

    def template(self) -> DistillJobSpec:
        """The job spec every round starts from (samples and output filled in per job)."""
        return DistillJobSpec(
            student_dir=self.student_dir, teacher_dir=self.teacher_dir,
            samples_file="", output_dir="", label_cache_dir=self.label_cache_dir,
            seed=self.seed, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
            akd=dict(self.akd), lora=dict(self.lora), labelling=dict(self.labelling),
            teacher_sharding=self.teacher_sharding, backend=self.backend)


class AkdJobTrainer:
    """`cloud.trainers.Trainer` that runs each round as a distillation job."""

    def __init__(self, config: AkdJobConfig) -> None:
        self.config = config
        self._template = config.template()
        self._launcher: Launcher = (InProcessLauncher() if config.nproc_per_node == 1 else
                                    TorchrunLauncher(config.nproc_per_node,
                                                     config.threads_per_rank))
        self.base_model_hash = checkpoint_hash(config.student_dir)
        student, formatter = load_checkpoint(config.student_dir)
        embeddings = cast(nn.Embedding, cast(Any, student).get_input_embeddings())
        self._width = int(embeddings.embedding_dim)
        self._full_visual = formatter.full_visual
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(config.seed)  # the same fresh LoRA a job with this seed starts from
            peft_model = attach_lora(student, self._template.lora_spec())
        self._initial = {k: v.detach().clone()
                         for k, v in get_peft_model_state_dict(peft_model).items()}

    def initial_adapter(self) -> StateDict:
        """The fresh LoRA weights (seeded) every device ships with."""
        return {k: v.clone() for k, v in self._initial.items()}

    def check_sample(self, sample: UploadSample) -> None:
        """Uploads must carry visual tokens the student can read."""
        tokens = sample.tokens
        if tokens is None:
            raise WireFormatError("tokens: required by the AKD trainer")
        if tokens.feature_space not in FEATURE_SPACES:
            raise WireFormatError(f"tokens.feature_space: must be one of {FEATURE_SPACES}, "
                                  f"got {tokens.feature_space!r}")
        width = tokens.values.shape[-1] if tokens.values.ndim == 2 else -1
        if tokens.feature_space == "projected" and width != self._width:
            raise WireFormatError(f"tokens.values: width must be {self._width} for projected "
                                  f"tokens, got shape {tuple(tokens.values.shape)}")
        grid_tokens = int(np.prod(tokens.grid)) if len(tokens.grid) else 0
        if self._full_visual is not None and grid_tokens > self._full_visual:
            # its positions would lie outside the visual block the models were trained on
            raise WireFormatError(f"tokens.grid: {list(tokens.grid)} holds {grid_tokens} tokens, "
                                  f"the student's visual block {self._full_visual}")

    def train(self, adapter: StateDict, samples: Sequence[UploadSample],
              ctx: JobContext, replay: Sequence[DistillSample] = ()) -> TrainResult:
        """Export the round (with the `replay` pool, mixed in at `akd.replay_ratio`), run it,
        return the new adapter (checkpointed once, at the end)."""
        restored = ctx.restore()
        if restored is not None and restored[0] >= self.config.steps:
            return TrainResult(adapter=restored[1], metrics={"restored": 1.0})
        job_dir = Path(self.config.work_dir) / ctx.job_id
        distill = [DistillSample.from_upload(s) for s in samples]
        spec = export_job(self._template, distill, job_dir, adapter, replay)
        result = self._launcher.run(spec)
        new = dict(safetensors.torch.load_file(result["adapter_path"]))
        metrics = {**result["metrics"], "label_hit_rate": float(result["labels"]["hit_rate"]),
                   "world_size": float(result["world_size"])}
        if not self.config.keep_job_dirs:
            shutil.rmtree(job_dir, ignore_errors=True)
        ctx.checkpoint(self.config.steps, new)
        return TrainResult(adapter=new, metrics=metrics)
