"""LoRA placement for AKD students: the LLM's attention/MLP, optionally the MLP projector.

The device must attach the same LoraConfig (same targets, rank, alpha) for adapter state dicts to
line up; `student_lora_config` is the one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from shared.errors import ConfigError

LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_TARGETS = r".*multi_modal_projector\.(linear_1|linear_2)"


@dataclass(frozen=True, slots=True)
class LoRASpec:
    """Student adapter shape."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: str = LLM_TARGETS
    """peft `target_modules` regex inside the LLM; must equal the device loader's."""
    include_projector: bool = False
    """Also adapt the projector; only trains when samples are in feature_space "vision"."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"`rank` must be >= 1, got {self.rank}")
        if self.alpha < 1:
            raise ConfigError(f"`alpha` must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1), got {self.dropout}")


def student_lora_config(spec: LoRASpec) -> LoraConfig:
    """The peft LoraConfig both sides use."""
    targets = spec.targets + (f"|{PROJECTOR_TARGETS}" if spec.include_projector else "")
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=targets, bias="none")


def attach_lora(model: nn.Module, spec: LoRASpec) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters; everything else is frozen by peft."""
    return get_peft_model(model, student_lora_config(spec))
