"""AKD on torch.distributed: the same job at world size 1 (embedded) and under torchrun (DDP
over the student's adapters, the frozen teacher replicated or FSDP-sharded)."""

from cloud.distributed.job import (
    ADAPTER_FILE,
    RESULT_FILE,
    JobOutcome,
    LabelStageResult,
    label_stage,
    load_checkpoint,
    run_job,
)
from cloud.distributed.launch import (
    InProcessLauncher,
    JobFailedError,
    Launcher,
    TorchrunLauncher,
    export_job,
)
from cloud.distributed.runtime import LaunchEnv, Runtime, TorchDDP, shard_teacher
from cloud.distributed.samples import load_samples, save_samples
from cloud.distributed.spec import DistillJobSpec

__all__ = [
    "ADAPTER_FILE", "DistillJobSpec", "InProcessLauncher", "JobFailedError", "JobOutcome",
    "LabelStageResult", "LaunchEnv", "Launcher", "RESULT_FILE", "Runtime", "TorchDDP",
    "TorchrunLauncher", "export_job", "label_stage", "load_checkpoint", "load_samples",
    "run_job", "save_samples", "shard_teacher",
]
