"""Save and load VLM checkpoint directories (standard `save_pretrained` layout + our metadata).

A directory holds config.json + model.safetensors (transformers), the tokenizer files, the
processor's `cdca_processor.json` and `cdca_meta.json` (role, zoo key, `vision_sha256`).
`load_vlm` also accepts a real Hugging Face checkpoint directory of a supported architecture
(`llava_onevision`, `qwen2_vl`) that has no cdca files: the tokenizer is loaded with
AutoTokenizer and the processor is derived from the model config (image size, patch size) and
`preprocessor_config.json` (mean/std) when present. Such a model keeps its own prompt
conventions; the processor's prompt layout is this project's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shared.errors import ConfigError, IntegrityError
from shared.models.architectures import ARCHITECTURES, architecture_of, visual_hash
from shared.models.processor import PROCESSOR_FILE, ProcessorConfig, VLMProcessor

log = logging.getLogger(__name__)
META_FILE = "cdca_meta.json"
QUANTIZATIONS = ("none", "int8", "nf4", "dynamic-int8")


@dataclass(slots=True)
class LoadedVLM:
    """A model ready for inference with its tokenizer, processor and metadata."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: VLMProcessor
    meta: dict[str, Any] = field(default_factory=dict)
    """`cdca_meta.json` contents plus `vision_sha256` recomputed at load and `quantization`."""
    path: Path | None = None


def save_vlm(model: PreTrainedModel, processor: VLMProcessor, directory: str | Path,
             meta: dict[str, Any], dtype: torch.dtype = torch.float16) -> str:
    """Write a checkpoint directory; returns the visual hash of the weights as saved.

    The hash is computed after the cast to `dtype`, so it matches what a load recomputes.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    vhash = visual_hash(model)
    model.config.vision_sha256 = vhash
    model.save_pretrained(d)
    processor.save_pretrained(d)
    (d / META_FILE).write_text(json.dumps({**meta, "vision_sha256": vhash}, indent=2) + "\n")
    return vhash


def _model_class(path: Path) -> type[PreTrainedModel]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"no config.json in {str(path)!r}; expected a save_pretrained dir")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    for arch in ARCHITECTURES.values():
        if arch.name == model_type:
            return arch.model_cls
    raise ConfigError(f"model_type {model_type!r} in {cfg_path} is not supported; "
                      f"expected one of {sorted(ARCHITECTURES)}")


def _quant_kwargs(quantization: str, arch: str) -> dict[str, Any]:
    if quantization in ("none", "dynamic-int8"):
        return {}
    from transformers import BitsAndBytesConfig  # bitsandbytes import is slow: only when asked

    visual = ["model.visual", "lm_head"] if arch == "qwen2_vl" else [
        "model.vision_tower", "model.multi_modal_projector", "lm_head"]
    if quantization == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=visual)
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=visual)
    return {"quantization_config": q, "device_map": "cpu"}


def _fallback_processor(path: Path, model: PreTrainedModel,
                        tokenizer: PreTrainedTokenizerBase) -> VLMProcessor:
    arch = architecture_of(model)
    vc = model.config.vision_config
    pre = path / "preprocessor_config.json"
    extra = json.loads(pre.read_text()) if pre.is_file() else {}
    size = getattr(vc, "image_size", None) or 14 * 2 * 16  # Qwen2-VL has no fixed size
    cfg = ProcessorConfig(
        architecture=arch.name, image_size=int(size), patch_size=int(vc.patch_size),
        image_mean=tuple(extra.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(extra.get("image_std", (0.5, 0.5, 0.5))),
    )
    return VLMProcessor(cfg, tokenizer)


def load_vlm(path: str | Path, quantization: str = "none") -> LoadedVLM:
    """Load a checkpoint directory for inference (eval mode, float32 compute).

    Args:
        path: a directory written by `save_vlm`, or a Hugging Face checkpoint directory of a
            supported architecture.
        quantization: "none", "int8" / "nf4" (bitsandbytes, language model only) or
            "dynamic-int8" (torch dynamic int8 Linear layers of the language model).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"`quantization` must be one of {QUANTIZATIONS}, got {quantization!r}")
    p = Path(path)
    cls = _model_class(p)
    arch = "qwen2_vl" if cls.__name__.startswith("Qwen2VL") else "llava_onevision"
    model = cls.from_pretrained(p, dtype=torch.float32, **_quant_kwargs(quantization, arch))
    model.eval()
    if quantization == "dynamic-int8":
        lm = model.model.language_model
        model.model.language_model = torch.ao.quantization.quantize_dynamic(
            lm, {torch.nn.Linear}, dtype=torch.qint8)
    if (p / PROCESSOR_FILE).is_file():
        processor = VLMProcessor.from_pretrained(p)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(p)
        processor = _fallback_processor(p, model, tokenizer)
    meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
    vhash = visual_hash(model)
    if meta.get("vision_sha256") and meta["vision_sha256"] != vhash:
        raise IntegrityError(f"visual weights of {str(p)!r} hash to {vhash[:16]}..., "
                             f"metadata says {meta['vision_sha256'][:16]}...")
    meta = {**meta, "vision_sha256": vhash, "quantization": quantization}
    return LoadedVLM(model=model, tokenizer=tokenizer, processor=processor, meta=meta, path=p)
