"""Samples files: the distillation inputs of a job as one safetensors file (never pickle).

Tensors are `<i>.visual_tokens` (K, D) float32 and `<i>.positions` (K,) int64; the other fields
of each `DistillSample` are JSON in the file's metadata under "samples".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from cloud.distill import DistillSample
from shared.errors import ConfigError

META_KEY = "samples"


def save_samples(samples: Sequence[DistillSample], path: str | Path) -> None:
    """Write `samples` to `path` (a .safetensors file)."""
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for i, s in enumerate(samples):
        tensors[f"{i}.visual_tokens"] = s.visual_tokens.detach().cpu().float().contiguous()
        if s.positions is not None:
            tensors[f"{i}.positions"] = s.positions.detach().cpu().long().contiguous()
        rows.append({"question": s.question, "grid": list(s.grid),
                     "reference_answer": s.reference_answer, "feature_space": s.feature_space,
                     "sample_id": s.sample_id})
    safetensors.torch.save_file(tensors, str(path), metadata={META_KEY: json.dumps(rows)})


def load_samples(path: str | Path) -> list[DistillSample]:
    """Read a file written by `save_samples`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`samples_file` {str(p)!r} does not exist")
    with safetensors.safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        if META_KEY not in meta:
            raise ConfigError(f"{str(p)!r} has no {META_KEY!r} metadata; not a samples file")
        rows = json.loads(meta[META_KEY])
        keys = set(f.keys())
        out = []
        for i, row in enumerate(rows):
            pos_key = f"{i}.positions"
            out.append(DistillSample(
                question=row["question"],
                visual_tokens=f.get_tensor(f"{i}.visual_tokens"),
                positions=f.get_tensor(pos_key) if pos_key in keys else None,
                grid=tuple(row["grid"]),
                reference_answer=row["reference_answer"],
                feature_space=row["feature_space"],
                sample_id=row["sample_id"],
            ))
    return out
