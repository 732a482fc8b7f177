"""Load the student VLM from a checkpoint directory onto a compressed base, with its LoRA adapter.

Base compression ("quantization"): "fp32"; "int8_dynamic" (torch dynamic int8 Linear in the LLM);
"bnb8" (bitsandbytes LLM.int8) or "bnb4" (bitsandbytes NF4, float32 compute). The vision tower and
projector stay in float32 in every mode: their post-projector tokens are what the device uploads and
the teacher consumes, so they must match the cloud's copy bit for bit in meaning.

The adapter is a peft LoRA on the LLM; `adapter_state` / `load_adapter_state` read and replace
its weights in place (no base reload), which is how downlink updates are applied.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoConfig, BitsAndBytesConfig

from shared.errors import ConfigError, IncompatibleUpdateError
from shared.models.architectures import architecture_of
from shared.models.processor import VLMProcessor

log = logging.getLogger(__name__)

QUANTIZATIONS = ("fp32", "int8_dynamic", "bnb8", "bnb4")
ADAPTER_SUBDIR = "adapter"
"""A checkpoint directory may carry its shipped LoRA adapter here (peft `save_pretrained`)."""


@dataclass(frozen=True, slots=True)
class StudentConfig:
    """Where the student comes from and how it is compressed."""

    checkpoint_dir: Path
    """HF `save_pretrained` directory of the student, plus the VLMProcessor files."""
    quantization: str = "fp32"
    """One of QUANTIZATIONS."""
    adapter_dir: Path | None = None
    """peft adapter directory; default `<checkpoint_dir>/adapter` if present, else a fresh LoRA
    (B = 0, so the model equals its base) built from the fields below."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = (r".*language_model.*\."
                         r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    """Regex of LLM modules carrying LoRA; must equal the cloud's (cloud/distill/adapters.py)."""
    lora_seed: int = 0
    """Seed of a fresh LoRA's A matrices, so every process builds the same version 0."""
    attention_scores: bool = True
    """Run the LLM with eager attention so answer->visual attention can rank tokens (UTS)."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"`quantization` must be one of {QUANTIZATIONS}, "
                              f"got {self.quantization!r}")
        if self.lora_r < 1:
            raise ConfigError(f"`lora_r` must be >= 1, got {self.lora_r}")


@dataclass(slots=True)
class Student:
    """The loaded student: peft model (eval mode), its processor, and how it was built."""

    model: PeftModel
    processor: VLMProcessor
    quantization: str
    checkpoint_dir: Path


def _visual_skip(config: Any) -> list[str]:
    """v5 module paths that bitsandbytes must leave alone: vision tower, projector, lm_head."""
    arch = architecture_of(config)
    return sorted({p.rstrip(".") for p in arch.visual_prefixes} | {"lm_head"})


def _quantization_config(quantization: str, config: Any) -> BitsAndBytesConfig | None:
    skip = _visual_skip(config)
    if quantization == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "bnb4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=skip)
    return None


def load_student(cfg: StudentConfig) -> Student:
    """Build the compressed student with its adapter (see module docstring)."""
    ckpt = cfg.checkpoint_dir
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"`checkpoint_dir` {str(ckpt)!r} has no config.json; expected an HF "
                          "save_pretrained directory")
    hf_config = AutoConfig.from_pretrained(ckpt)
    arch = architecture_of(hf_config)
    qconf = _quantization_config(cfg.quantization, hf_config)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if qconf is not None:
        kwargs.update(quantization_config=qconf, device_map="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' kernel-hub fallback notice
        base = arch.model_cls.from_pretrained(ckpt, **kwargs)
    if cfg.attention_scores:
        base.set_attn_implementation({"text_config": "eager"})
    adapter_dir = cfg.adapter_dir or (ckpt / ADAPTER_SUBDIR)
    if (adapter_dir / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    elif cfg.adapter_dir is not None:
        raise ConfigError(f"`adapter_dir` {str(adapter_dir)!r} has no adapter_config.json")
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          target_modules=cfg.lora_targets, lora_dropout=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.lora_seed)
            model = get_peft_model(base, lora)
    if cfg.quantization == "int8_dynamic":
        model = _int8_dynamic(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("student loaded", extra={"checkpoint": str(ckpt), "quantization": cfg.quantization,
                                      "adapter_tensors": len(adapter_state(model))})
    return Student(model, VLMProcessor.from_pretrained(ckpt), cfg.quantization, ckpt)


def _int8_dynamic(model: PeftModel) -> PeftModel:
    """Dynamic int8 on the LLM's Linear layers (LoRA branches and lm_head stay float32)."""
    names = {n: torch.ao.quantization.default_dynamic_qconfig
             for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".language_model." in n and "lora_" not in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8,
                                                      inplace=True)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter weights (peft state-dict names), float32 copies."""
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Replace the adapter weights in place; every name and shape must match exactly."""
    current = get_peft_model_state_dict(model)
    if set(current) != set(state):
        raise IncompatibleUpdateError(
            f"adapter tensors differ: missing {sorted(set(current) - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - set(current))[:3]}")
    adapter = model.active_adapter
    # peft state-dict names drop the adapter name that the parameter names carry
    params = {n.replace(f".{adapter}.", "."): p for n, p in model.named_parameters()}
    for name, new in state.items():
        target = params.get(name)
        if target is None:
            raise IncompatibleUpdateError(f"adapter tensor {name!r} has no parameter")
        if tuple(target.shape) != tuple(new.shape):
            raise IncompatibleUpdateError(f"adapter tensor {name!r}: shape {tuple(new.shape)}, "
                                          f"expected {tuple(target.shape)}")
        target.copy_(new.to(target.dtype))


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (quantized packed weights included)."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():  # torch dynamic-quantized Linear keeps packed weights off-params
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w, b = m._packed_params._weight_bias()  # noqa: SLF001
            total += w.numel() * w.element_size() + (b.numel() * 4 if b is not None else 0)
    return total
