"""One AKD job, identical on every rank: labelling stage (cached), then DDP distillation.

`run_job(spec, runtime)` is what `python -m cloud.distributed.run` runs under torchrun and what an
embedded worker calls in-process at world size 1. Rank 0 writes `adapter.safetensors` and
`result.json` into the spec's output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import set_peft_model_state_dict
from torch import nn
from transformers import AutoModelForImageTextToText, AutoTokenizer

from cloud.distill import (
    AdapterDistiller,
    DistillSample,
    PromptFormatter,
    TeacherLabel,
    attach_lora,
    label,
)
from cloud.distributed.runtime import FSDP_MARK, Runtime, shard_teacher
from cloud.distributed.samples import load_samples
from cloud.distributed.spec import DistillJobSpec
from cloud.labels import (
    LabelCache,
    LabellingConfig,
    SqliteLabelCache,
    checkpoint_hash,
    label_key,
    prompt_digest,
)
from shared.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
RESULT_FILE = "result.json"
CDCA_PROCESSOR_FILE = "cdca_processor.json"
ANSWER_TOKEN = "<ans>"


@dataclass(frozen=True, slots=True)
class LabelStageResult:
    """What the labelling stage found in the cache and what it had to compute."""

    samples: int
    hits: int
    """Labels already cached when the stage started (rank 0's lookup, shared by all ranks)."""
    labelled_here: int
    """Misses this rank ran the teacher on (padding repeats for FSDP not counted)."""
    wall_s: float

    @property
    def hit_rate(self) -> float:
        """hits / samples."""
        return self.hits / self.samples if self.samples else 0.0


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a rank returns; rank 0 also writes it as result.json next to the adapter."""

    world_size: int
    labels: LabelStageResult
    metrics: dict[str, float] = field(default_factory=dict)
    """The distiller's summary plus samples_per_s (global batch x steps / training wall)."""
    history: list[dict[str, float]] = field(default_factory=list)
    adapter_path: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (includes the hit rate)."""
        out = asdict(self)
        out["labels"]["hit_rate"] = self.labels.hit_rate
        return out


def load_checkpoint(directory: str | Path, media_kind: str = "video"
                    ) -> tuple[nn.Module, PromptFormatter]:
    """A VLM checkpoint directory (save_pretrained layout) and its prompt formatter.

    A zoo checkpoint (with `cdca_processor.json`) goes through `shared.models.load_vlm`; any
    other supported transformers checkpoint is loaded with the Auto classes and its formatter is
    derived from the tokenizer's special tokens and the config's placeholder ids.
    """
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ConfigError(f"{str(d)!r} is not a checkpoint directory (no config.json)")
    if (d / CDCA_PROCESSOR_FILE).is_file():
        from shared.models.checkpoint import load_vlm  # zoo checkpoints only

        loaded = load_vlm(d)
        return loaded.model, PromptFormatter.from_processor(loaded.processor, media_kind)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    cfg = model.config
    name = "video_token" if media_kind == "video" else "image_token"
    visual_id = getattr(cfg, f"{name}_index", None)
    visual_id = getattr(cfg, f"{name}_id", None) if visual_id is None else visual_id
    if visual_id is None:
        raise ConfigError(f"{str(d)!r}: config has no {name} id for media_kind {media_kind!r}")
    vocab = tok.get_vocab()
    return model, PromptFormatter(
        tokenizer=tok, visual_id=int(visual_id), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id, answer_id=vocab.get(ANSWER_TOKEN),
    )


def _pending(samples: list[DistillSample], keys: list[str], cache: LabelCache,
             runtime: Runtime) -> list[int]:
    """Indices not cached yet, as rank 0 sees them (all ranks must split the same list)."""
    miss = torch.tensor([not cache.contains(k) for k in keys], dtype=torch.uint8)  # (n,)
    miss = runtime.broadcast(miss)
    return [int(i) for i in torch.nonzero(miss).flatten()]


def label_stage(
    teacher: nn.Module | None, samples: list[DistillSample], formatter: PromptFormatter,
    cache: LabelCache, teacher_hash: str, config: LabellingConfig, runtime: Runtime,
    *, batch_size: int = 16, pending: list[int] | None = None,
) -> LabelStageResult:
    """Label the uncached samples, each rank a strided share, in batches written to the cache.

    With an FSDP teacher every rank must run the same sequence of forwards, so the misses are
    split into those generated and those teacher-forced (reference answers), and each rank's
    share of a group is padded to the same length with repeats that are not stored.
    """
    start = time.monotonic()
    prompt = prompt_digest(formatter)
    keys = [label_key(teacher_hash, s, config, prompt) for s in samples]
    todo = _pending(samples, keys, cache, runtime) if pending is None else pending
    if todo and teacher is None:
        raise ConfigError(f"{len(todo)} labels are not cached and the job has no `teacher_dir`")
    forced = [i for i in todo if config.prefer_reference
              and samples[i].reference_answer is not None]
    groups = [sorted(set(todo) - set(forced)), forced]
    lockstep = runtime.world_size > 1 and getattr(teacher, FSDP_MARK, False)
    done = 0
    for group in groups:
        share = [(i, False) for i in group[runtime.rank::runtime.world_size]]
        if lockstep and group:
            share += [(group[0], True)] * (math.ceil(len(group) / runtime.world_size) - len(share))
        for b in range(0, len(share), batch_size):
            chunk = share[b:b + batch_size]
            assert teacher is not None  # todo is non-empty here, checked above
            labs = label(teacher, [samples[i] for i, _ in chunk], formatter,
                         max_new_tokens=config.max_new_tokens,
                         prefer_reference=config.prefer_reference)
            for (i, padding), lab in zip(chunk, labs, strict=True):
                if not padding:
                    cache.put(keys[i], lab)
                    done += 1
    runtime.barrier()  # every label is in the cache before anyone reads them back
    result = LabelStageResult(samples=len(samples), hits=len(samples) - len(todo),
                              labelled_here=done, wall_s=time.monotonic() - start)
    log.info("labelling stage: %d of %d cached, %d labelled on rank %d in %.2f s",
             result.hits, result.samples, done, runtime.rank, result.wall_s)
    return result


def _select(samples: list[DistillSample], ids: tuple[str, ...]) -> list[DistillSample]:
    if not ids:
        return samples
    by_id = {s.sample_id: s for s in samples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ConfigError(f"`sample_ids` not in the samples file: {unknown[:5]}")
    return [by_id[i] for i in ids]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_job(spec: DistillJobSpec, runtime: Runtime, stage: str = "all") -> JobOutcome:
    """Run the job's stages ("all", "label" only, or "distill" only) on this rank."""
    if stage not in ("all", "label", "distill"):
        raise ConfigError(f"`stage` must be 'all', 'label' or 'distill', got {stage!r}")
    stored = load_samples(spec.samples_file)
    replay = _select(stored, spec.replay_ids) if spec.replay_ids else []
    pool = set(spec.replay_ids)
    samples = _select([s for s in stored if s.sample_id not in pool], spec.sample_ids)
    if not samples:
        raise ConfigError(f"`samples_file` {spec.samples_file!r} holds no samples")
    n = len(samples)
    samples = [*samples, *replay]  # labelled together; split again for the fit
    student, formatter = load_checkpoint(spec.student_dir, spec.media_kind)
    cache = SqliteLabelCache(spec.label_cache_dir)
    try:
        config = spec.labelling_config()
        teacher_hash = spec.teacher_hash or checkpoint_hash(str(spec.teacher_dir))
        prompt = prompt_digest(formatter)
        keys = [label_key(teacher_hash, s, config, prompt) for s in samples]
        todo = _pending(samples, keys, cache, runtime) if stage != "distill" else []
        teacher = None
        if todo:  # the teacher is loaded only when something is not cached yet
            if spec.teacher_dir is None:
                raise ConfigError(f"{len(todo)} labels are not cached and `teacher_dir` is null")
            teacher, _ = load_checkpoint(spec.teacher_dir, spec.media_kind)
            teacher = shard_teacher(teacher, runtime, spec.teacher_sharding)
        stats = label_stage(teacher, samples, formatter, cache, teacher_hash, config, runtime,
                            batch_size=spec.label_batch_size, pending=todo)
        del teacher
        if stage == "label":
            return JobOutcome(world_size=runtime.world_size, labels=stats)
        got = [cache.get(k) for k in keys]
        missing = [s.sample_id for s, lab in zip(samples, got, strict=True) if lab is None]
        if missing:
            raise ConfigError(f"labels missing from the cache for samples {missing[:5]}; "
                              "run the label stage first")
        labels: list[TeacherLabel] = [lab for lab in got if lab is not None]
    finally:
        cache.close()
    torch.manual_seed(spec.seed)  # the fresh LoRA A matrices: identical on every rank
    student = attach_lora(student, spec.lora_spec())
    if spec.adapter_in is not None:
        set_peft_model_state_dict(student, safetensors.torch.load_file(spec.adapter_in))
    student.to(runtime.device)
    cfg = spec.akd_config()
    result = AdapterDistiller(cfg).fit(student, None, samples[:n], formatter=formatter,
                                       labels=labels[:n], replay=samples[n:],
                                       replay_labels=labels[n:],
                                       parallel=runtime.data_parallel())
    metrics = dict(result.metrics)
    metrics["samples_per_s"] = cfg.steps * cfg.batch_size / max(metrics["wall_s"], 1e-9)
    outcome = JobOutcome(world_size=runtime.world_size, labels=stats, metrics=metrics,
                         history=[dict(h) for h in result.history])
    if runtime.is_main:
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / ADAPTER_FILE, safetensors.torch.save(result.adapter))
        outcome = JobOutcome(world_size=outcome.world_size, labels=stats, metrics=metrics,
                             history=outcome.history, adapter_path=str(out / ADAPTER_FILE))
        _write_atomic(out / RESULT_FILE, (json.dumps(outcome.to_json(), indent=2) + "\n").encode())
    runtime.barrier()
    return outcome
