"""Accuracy of the zoo models and of the adapter versions the devices stored on disk.

The adapters are peft LoRA state dicts (`<data_dir>/adapters/v<version>.safetensors`, see the
device's adapter store); they are loaded here onto a fresh copy of the student with the same
LoRA shape the device uses. `Evaluator` runs the uncompressed student (all visual tokens) with
`shared.models.evaluate`, so it measures the adapter, not the device's token compression;
`ServedEvaluator` runs what a device serves: the device runtime's student with its default token
compressor (VidCom2, half the tokens kept, original positions), the only place the demo
imports `device`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from shared.media import procedural as P
from shared.models import evaluate, load_vlm

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def eval_sets(domains: Sequence[str], n: int, seed: int, image_size: int, num_frames: int
              ) -> dict[str, list[P.QASample]]:
    """`n` held-out video questions per domain (a seed no device stream uses)."""
    gen = P.GeneratorConfig(frame_size=image_size, num_frames=num_frames)
    return {d: P.batch(d, n, seed, "video", gen) for d in domains}


class Evaluator:
    """Caches accuracies by adapter content, so a version evaluated once is not rerun."""

    def __init__(self, teacher_dir: Path, student_dir: Path, sets: dict[str, list[P.QASample]],
                 lora_r: int = 8, lora_alpha: int = 16) -> None:
        self.teacher_dir, self.student_dir, self.sets = teacher_dir, student_dir, sets
        self.lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=LORA_TARGETS,
                               lora_dropout=0.0)
        self._student: Any = None
        self._cache: dict[str, dict[str, float]] = {}
        hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars

    def _score(self, loaded: Any) -> dict[str, float]:
        return {d: float(evaluate(loaded, s)["overall"]["acc"]) for d, s in self.sets.items()}

    def teacher(self) -> dict[str, float]:
        return self._score(load_vlm(self.teacher_dir))

    def student(self) -> dict[str, float]:
        return self._score(load_vlm(self.student_dir))

    def adapter(self, path: Path) -> dict[str, float]:
        """Accuracy per eval domain of the student carrying the adapter in `path`."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in self._cache:
            if self._student is None:
                loaded = load_vlm(self.student_dir)
                peft_model: Any = get_peft_model(loaded.model, self.lora)
                self._student = dataclasses.replace(loaded, model=peft_model)
            state = load_file(str(path))
            expected = set(get_peft_model_state_dict(self._student.model))
            if set(state) != expected:
                raise ValueError(f"{path}: adapter tensors differ from the student's LoRA: "
                                 f"{sorted(set(state) ^ expected)[:3]}")
            set_peft_model_state_dict(self._student.model, state)
            with torch.no_grad():
                self._cache[digest] = self._score(self._student)
        return self._cache[digest]


class ServedEvaluator:
    """Accuracy of what a device serves: `device.runtime` with the device's default compressor
    (the demo's devices set none), answers compared by exact match; cached by adapter content."""

    def __init__(self, student_dir: Path, sets: dict[str, list[P.QASample]],
                 batch_size: int = 16) -> None:
        from device.compress import COMPRESSORS
        from device.runtime.inference import DeviceInference
        from device.runtime.loader import StudentConfig, load_student
        from device.settings import COMPRESSOR_DEFAULTS, DeviceSettings, ModelSettings

        name = DeviceSettings.model_fields["compressor"].default
        self._student = load_student(StudentConfig(student_dir))
        self._inference = DeviceInference(
            self._student, COMPRESSORS.build(name, COMPRESSOR_DEFAULTS.get(name, {})),
            original_positions=ModelSettings.model_fields["original_positions"].default)
        self.sets, self.batch_size = sets, batch_size
        self._base = {k: v.clone() for k, v in
                      get_peft_model_state_dict(self._student.model).items()}
        self._cache: dict[str, dict[str, float]] = {}

    def _score(self) -> dict[str, float]:
        out = {}
        for domain, items in self.sets.items():
            hits = 0
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                res = self._inference.run([s.frames for s in chunk], [s.question for s in chunk],
                                          [s.sample_id for s in chunk])
                hits += sum(r.answer.strip().lower() == s.answer.strip().lower()
                            for r, s in zip(res, chunk, strict=True))
            out[domain] = hits / len(items)
        return out

    def adapter(self, path: Path | None) -> dict[str, float]:
        """Served accuracy per eval domain with the adapter in `path` (None: version 0)."""
        from device.runtime.loader import load_adapter_state

        key = "v0" if path is None else hashlib.sha256(path.read_bytes()).hexdigest()
        if key not in self._cache:
            load_adapter_state(self._student.model, self._base if path is None
                               else load_file(str(path)))
            self._cache[key] = self._score()
        return self._cache[key]
