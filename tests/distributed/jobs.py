"""Tiny teacher/student checkpoint directories, a samples file and job specs for the tests and
bench/scaleout.py (built in-process from configs, no downloads)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from cloud.distill import DistillSample
from cloud.distributed import DistillJobSpec, save_samples
from tests.distill import tiny_pair as tp


def free_port() -> int:
    """A loopback port nothing listens on right now (for torchrun's --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_inputs(root: Path, generated: int = 9, forced: int = 3,
                teacher_layers: int = 3) -> tuple[Path, Path, Path]:
    """(student dir, teacher dir, samples file): samples needing generation, then samples with
    reference answers (teacher-forced)."""
    tok = tp.tokenizer()
    dirs = []
    for name, (layers, seed) in {"student": (1, 3), "teacher": (teacher_layers, 1)}.items():
        d = root / name
        tp.vlm(layers, seed).save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    samples: list[DistillSample] = (tp.samples(generated, seed=2)
                                    + tp.samples(forced, seed=5, with_reference=True))
    path = root / "samples.safetensors"
    save_samples(samples, path)
    return dirs[0], dirs[1], path


def spec(root: Path, out: str, cache: str, **overrides: object) -> DistillJobSpec:
    """An AKD job over `make_inputs(root)` writing to root/out with its label cache root/cache."""
    fields: dict[str, object] = dict(
        student_dir=str(root / "student"), teacher_dir=str(root / "teacher"),
        samples_file=str(root / "samples.safetensors"), output_dir=str(root / out),
        label_cache_dir=str(root / cache), steps=8, batch_size=4, lr=5e-3, seed=7,
        lora={"rank": 4, "alpha": 8}, labelling={"max_new_tokens": 5})
    fields.update(overrides)
    return DistillJobSpec(**fields)  # type: ignore[arg-type]


def single_process_env() -> None:
    """Keep the in-process world-size-1 run off other helpers' cores."""
    torch.set_num_threads(1)
