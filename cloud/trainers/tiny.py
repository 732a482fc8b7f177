"""A tiny but real distillation trainer ("tiny-kd") for machines without a model zoo.

A frozen MLP teacher labels every uploaded visual token with a class distribution; a smaller MLP
student learns it through LoRA adapters on both linears (logit KD with temperature, Hinton et
al.). The LoRA layer is written out here (same math and key names as peft's `lora_A`/`lora_B`)
because importing peft costs seconds per daemon start, and this trainer exists to be fast.
Everything the worker does around a trainer (claiming samples, checkpoints, resuming after a
crash, DWC encoding, signing, publishing) is therefore exercised with real tensors and a real
optimizer, in seconds on one CPU thread. The device side can rebuild the same student from the
same config to apply the updates.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloud.trainers.base import JobContext, StateDict, TrainResult
from shared.errors import ConfigError, WireFormatError
from shared.types import UploadSample


@dataclass(frozen=True, slots=True)
class TinyKdConfig:
    """Options of the "tiny-kd" trainer."""

    dim: int = 32
    """Width D of the uploaded visual tokens the models read."""
    hidden: int = 32
    """Student hidden width."""
    teacher_hidden: int = 128
    """Teacher hidden width."""
    classes: int = 16
    """Output classes of both models."""
    rank: int = 4
    """LoRA rank of the student adapters."""
    steps: int = 40
    """Optimizer steps per round (full batch)."""
    lr: float = 0.02
    """Adam learning rate."""
    temperature: float = 2.0
    """KD softmax temperature."""
    checkpoint_every: int = 5
    """Steps between checkpoints (the last step always checkpoints)."""
    step_pause_s: float = 0.0
    """Sleep after each step, yielding the CPU to RPC handlers on small shared machines."""
    feature_space: str = "tiny/features"
    """The only `VisualTokens.feature_space` accepted."""
    seed: int = 0
    """Seed of both models' weights (the device builds the same student from it)."""

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "teacher_hidden", "classes", "rank", "steps",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.temperature > 0 or self.step_pause_s < 0:
            raise ConfigError(
                f"`lr` and `temperature` must be > 0 and `step_pause_s` >= 0, got lr={self.lr},"
                f" temperature={self.temperature}, step_pause_s={self.step_pause_s}")


class LoraLinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T with `base` frozen; B starts at zero (peft init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)  # weight (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale  # (N, out)


def _mlp(dim: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))


def build_student(cfg: TinyKdConfig) -> nn.Sequential:
    """The student base with LoRA on both linears; weights depend on `cfg.seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        first, second = nn.Linear(cfg.dim, cfg.hidden), nn.Linear(cfg.hidden, cfg.classes)
        alpha = 2.0 * cfg.rank
        return nn.Sequential(LoraLinear(first, cfg.rank, alpha), nn.GELU(),
                             LoraLinear(second, cfg.rank, alpha))


def adapter_state(student: nn.Module) -> StateDict:
    """The LoRA weights only, detached copies (what travels as updates)."""
    return {k: v.detach().clone() for k, v in student.state_dict().items() if ".lora_" in k}


def load_adapter(student: nn.Module, adapter: StateDict) -> None:
    """Set the LoRA weights; the names must match exactly."""
    missing = set(adapter_state(student)) ^ set(adapter)
    if missing:
        raise ConfigError(f"adapter: names differ from the student's: {sorted(missing)[:4]}")
    student.load_state_dict(adapter, strict=False)


def build_teacher(cfg: TinyKdConfig) -> nn.Module:
    """The frozen teacher; weights depend on `cfg.seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        teacher = _mlp(cfg.dim, cfg.teacher_hidden, cfg.classes)
    return teacher.requires_grad_(False).eval()


class TinyKdTrainer:
    """Logit distillation from a tiny teacher into a tiny student's LoRA adapters."""

    def __init__(self, cfg: TinyKdConfig) -> None:
        self.cfg = cfg
        self._teacher = build_teacher(cfg)
        student = build_student(cfg)
        base = {k: v for k, v in student.state_dict().items() if ".lora_" not in k}
        digest = hashlib.sha256()
        for name in sorted(base):
            digest.update(name.encode())
            digest.update(base[name].numpy().tobytes())
        self.base_model_hash = digest.hexdigest()
        self._initial = adapter_state(student)

    def initial_adapter(self) -> StateDict:
        """The LoRA weights every device ships with (version 0)."""
        return {k: v.clone() for k, v in self._initial.items()}

    def check_sample(self, sample: UploadSample) -> None:
        """Only visual tokens of `cfg.feature_space` with width `cfg.dim` can be learnt from."""
        t = sample.tokens
        if t is None:
            raise WireFormatError("tokens: required by the tiny-kd trainer (frames are not used)")
        if t.feature_space != self.cfg.feature_space:
            raise WireFormatError(
                f"tokens.feature_space: got {t.feature_space!r}, expected"
                f" {self.cfg.feature_space!r}")
        if t.values.shape[1] != self.cfg.dim:
            raise WireFormatError(
                f"tokens.values.shape: got {tuple(t.values.shape)}, expected (K, {self.cfg.dim})")

    def train(self, adapter: StateDict, samples: Sequence[UploadSample],
              ctx: JobContext) -> TrainResult:
        """Full-batch Adam on the KD loss; checkpoints adapter + optimizer state."""
        cfg = self.cfg
        student = build_student(cfg)
        load_adapter(student, adapter)
        params = sorted((n, p) for n, p in student.named_parameters() if p.requires_grad)
        opt = torch.optim.Adam([p for _, p in params], lr=cfg.lr)
        x = torch.from_numpy(np.concatenate(
            [s.tokens.dequantized() for s in samples if s.tokens is not None]))  # (N, D)
        with torch.no_grad():
            target = F.softmax(self._teacher(x) / cfg.temperature, dim=-1)  # (N, C)
        start, first_loss = 0, float("nan")
        restored = ctx.restore()
        if restored is not None:
            start, tensors = restored
            _unpack(tensors, params, opt)
            first_loss = float(tensors["metrics.first_loss"])
        loss_value = float("nan")
        for step in range(start, cfg.steps):
            log_p = F.log_softmax(student(x) / cfg.temperature, dim=-1)  # (N, C)
            loss = F.kl_div(log_p, target, reduction="batchmean") * cfg.temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
            if step == 0:
                first_loss = loss_value
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                ctx.checkpoint(step + 1, _pack(params, opt, first_loss))
            if cfg.step_pause_s:
                time.sleep(cfg.step_pause_s)
        new = adapter_state(student)
        return TrainResult(new, {
            "loss_first": first_loss, "loss_last": loss_value, "steps": float(cfg.steps),
            "resumed_at_step": float(start), "samples": float(len(samples)),
            "tokens": float(x.shape[0]),
        })


def _pack(params: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
          first_loss: float) -> StateDict:
    out = {f"param.{n}": p.detach().clone() for n, p in params}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{idx}.{key}"] = torch.as_tensor(value).clone()
    out["metrics.first_loss"] = torch.tensor(first_loss)
    return out


def _unpack(tensors: StateDict, params: list[tuple[str, nn.Parameter]],
            opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param.{n}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    full = opt.state_dict()
    full["state"] = state
    opt.load_state_dict(full)
