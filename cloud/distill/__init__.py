"""Cloud-side distillation (AKD): teacher pseudo-labels distilled into student LoRA adapters."""

from __future__ import annotations

from cloud.distill.adapters import LoRASpec, attach_lora, student_lora_config
from cloud.distill.akd import (
    AdapterDistiller,
    AKDConfig,
    SingleProcess,
    answer_exact_match,
    answer_nll,
    label,
)
from cloud.distill.base import (
    DataParallel,
    Distiller,
    DistillResult,
    DistillSample,
    TeacherLabel,
)
from cloud.distill.prompt import PromptFormatter
from shared.registry import Registry

DISTILLERS: Registry[Distiller] = Registry("distiller")
DISTILLERS.register("akd", AKDConfig, AdapterDistiller)

__all__ = [
    "AKDConfig", "AdapterDistiller", "DISTILLERS", "DataParallel", "DistillResult",
    "DistillSample", "Distiller", "LoRASpec", "PromptFormatter", "SingleProcess", "TeacherLabel",
    "answer_exact_match", "answer_nll", "attach_lora", "label", "student_lora_config",
]
