"""The job spec: everything a distillation job needs, as a JSON file a launcher hands over.

The same file drives the embedded worker (world size 1, in-process) and a `torchrun` job
(`torchrun --nproc-per-node N -m cloud.distributed.run --job job.json`); paths are read by every
rank, so on several machines they must name shared storage (see docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.distill import AKDConfig, LoRASpec
from cloud.labels import LabellingConfig
from shared.errors import ConfigError

TEACHER_SHARDING = ("replicate", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
STAGES = ("all", "label", "distill")


@dataclass(frozen=True)
class DistillJobSpec:
    """One AKD job (`from_json` / `to_json`)."""

    student_dir: str
    """Student checkpoint directory (save_pretrained layout)."""
    samples_file: str
    """Inputs as a safetensors samples file (`cloud.distributed.samples`)."""
    output_dir: str
    """Rank 0 writes adapter.safetensors and result.json here."""
    label_cache_dir: str
    """Teacher label cache (`cloud.labels.SqliteLabelCache`) shared by jobs and retries."""
    teacher_dir: str | None = None
    """Teacher checkpoint directory; None when every label is already cached."""
    teacher_hash: str = ""
    """Cache identity of the teacher; empty: the sha256 of `teacher_dir`'s files."""
    sample_ids: tuple[str, ...] = ()
    """Train on these samples of the file only (empty: all of them but the replay ones)."""
    replay_ids: tuple[str, ...] = ()
    """Samples of the file that form the replay pool, mixed into each batch at
    `akd.replay_ratio` (empty: no replay)."""
    adapter_in: str | None = None
    """Adapter (safetensors) to start from, e.g. the device's head; None: fresh LoRA."""
    seed: int = 0
    """Seeds the fresh LoRA weights and the batch draw."""
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 4
    """Global batch: split across ranks, so the update does not depend on the world size."""
    akd: dict[str, Any] = field(default_factory=dict)
    """Further `AKDConfig` options (steps, lr, batch_size and seed come from above)."""
    lora: dict[str, Any] = field(default_factory=dict)
    """`LoRASpec` options; must match the device's."""
    labelling: dict[str, Any] = field(default_factory=dict)
    """`LabellingConfig` options."""
    label_batch_size: int = 16
    """Samples a rank labels between two cache writes."""
    teacher_sharding: str = "replicate"
    """"replicate": every labelling rank holds the whole teacher; "fsdp": its parameters are
    sharded across ranks with FSDP (for a teacher larger than one device)."""
    backend: str = "auto"
    """torch.distributed backend: "auto" is nccl on CUDA, gloo on CPU."""
    media_kind: str = "video"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "label_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"`lr` must be > 0, got {self.lr}")
        if self.teacher_sharding not in TEACHER_SHARDING:
            raise ConfigError(f"`teacher_sharding` must be one of {TEACHER_SHARDING}, "
                              f"got {self.teacher_sharding!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if self.teacher_dir is None and not self.teacher_hash:
            raise ConfigError("`teacher_hash` is required when `teacher_dir` is null: it keys "
                              "the cached labels")
        clash = {"steps", "lr", "batch_size", "seed"} & set(self.akd)
        if clash:
            raise ConfigError(f"`akd` must not set {sorted(clash)}; they are top-level fields")
        self.akd_config()
        self.lora_spec()
        self.labelling_config()

    def akd_config(self) -> AKDConfig:
        """The distiller's options."""
        return _build(AKDConfig, "akd", {**self.akd, "steps": self.steps, "lr": self.lr,
                                         "batch_size": self.batch_size, "seed": self.seed})

    def lora_spec(self) -> LoRASpec:
        """The student's adapter shape."""
        return _build(LoRASpec, "lora", self.lora)

    def labelling_config(self) -> LabellingConfig:
        """The labelling options that key the cache."""
        return _build(LabellingConfig, "labelling", self.labelling)

    @classmethod
    def from_json(cls, path: str | Path) -> DistillJobSpec:
        """Read and validate a spec file; unknown fields are a ConfigError."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"job spec {str(path)!r}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"job spec {str(path)!r} must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"job spec has unknown fields {unknown}; known: {sorted(known)}")
        for name in ("sample_ids", "replay_ids"):
            if name in raw:
                raw[name] = tuple(raw[name])
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"job spec {str(path)!r}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        """Write the spec as JSON."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def _build(cls: Any, name: str, options: dict[str, Any]) -> Any:
    try:
        return cls(**options)
    except TypeError:
        valid = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"`{name}` has unknown options {sorted(options)}; valid: {valid}"
                          ) from None
