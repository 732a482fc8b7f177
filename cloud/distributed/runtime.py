"""torch.distributed plumbing of an AKD job: process group, DDP over the adapters, FSDP teacher.

World size 1 (the embedded worker) needs no process group and trains through
`cloud.distill.SingleProcess`; a `torchrun` job gets `TorchDDP`, which wraps the AKD objective in
`DistributedDataParallel` so the LoRA (and feature projection) gradients are all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cloud.distill import DataParallel, SingleProcess
from shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher (torchrun, a Kubernetes Job) says."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} / world size {self.world_size}: expected "
                              "world_size >= 1 and 0 <= rank < world_size")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LaunchEnv:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: a single process)."""
        try:
            return cls(rank=int(environ.get("RANK", "0")),
                       world_size=int(environ.get("WORLD_SIZE", "1")),
                       local_rank=int(environ.get("LOCAL_RANK", "0")))
        except ValueError as e:
            raise ConfigError(f"torchrun environment: {e}") from None


class Runtime:
    """This process's rank, device and (for world size > 1) its process group."""

    def __init__(self, env: LaunchEnv, backend: str = "auto", timeout_s: float = 1800.0) -> None:
        self.rank = env.rank
        self.world_size = env.world_size
        cuda = torch.cuda.is_available()
        self.backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        if self.backend == "nccl" and not cuda:
            raise ConfigError("`backend` 'nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
        self.device = torch.device("cuda", env.local_rank) if self.backend == "nccl" else \
            torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            # env:// rendezvous: MASTER_ADDR / MASTER_PORT come from the launcher
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=timedelta(seconds=timeout_s))
            self._owns_group = True
            log.info("process group up: rank %d of %d, backend %s", self.rank, self.world_size,
                     self.backend)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes outputs."""
        return self.rank == 0

    def data_parallel(self) -> DataParallel:
        """DDP across the ranks, or the single-process identity at world size 1."""
        return TorchDDP(self) if self.world_size > 1 else SingleProcess()

    def barrier(self) -> None:
        """Wait for every rank (no-op alone)."""
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's copy of a small CPU tensor on every rank (tensors only: nothing pickled)."""
        if self.world_size == 1:
            return values
        t = values.to(self.device)
        dist.broadcast(t, src=0)
        return t.cpu()

    def close(self) -> None:
        """Tear down the process group this runtime created."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


class TorchDDP:
    """`cloud.distill.DataParallel` on torch DDP: gradients are averaged by all-reduce."""

    def __init__(self, runtime: Runtime) -> None:
        self.rank = runtime.rank
        self.world_size = runtime.world_size
        self._device = runtime.device

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP over the module's trainable parameters (rank 0's weights are broadcast first).

        Projector LoRA weights get no gradient from samples already in the projected feature
        space, so DDP is told to look for unused parameters when there are any such weights.
        Buffers (rotary tables) are deterministic: synced at init only.
        """
        ids = [self._device.index] if self._device.type == "cuda" else None
        maybe_unused = any(p.requires_grad and "multi_modal_projector" in n
                           for n, p in module.named_parameters())
        return DistributedDataParallel(module.to(self._device), device_ids=ids,
                                       forward_sync_buffers=False,
                                       find_unused_parameters=maybe_unused)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a small CPU tensor."""
        t = values.to(self._device)
        dist.all_reduce(t)
        return t.cpu()


FSDP_MARK = "_is_fsdp_managed_module"
"""transformers' flag for an FSDP-managed model: `generate` then keeps every rank stepping until
all ranks finish (synced_gpus), so sharded ranks never wait on a collective alone."""


def shard_teacher(teacher: nn.Module, runtime: Runtime, mode: str) -> nn.Module:
    """Place the frozen teacher: whole on this rank ("replicate") or its decoder layers sharded
    across ranks with FSDP2 ("fsdp"), each layer gathered only while it runs.

    Embeddings, vision tower and projector stay whole: AKD calls them outside the model's
    forward to splice the uploaded visual tokens in, and they are small next to the layers.
    """
    teacher = teacher.to(runtime.device).eval().requires_grad_(False)
    if mode == "replicate" or runtime.world_size == 1:
        return teacher
    if mode != "fsdp":
        raise ConfigError(f"`teacher_sharding` must be 'replicate' or 'fsdp', got {mode!r}")
    from torch.distributed.fsdp import fully_shard

    layers = [m for name, m in teacher.named_modules()
              if name.endswith(".layers") and isinstance(m, nn.ModuleList)
              and "language_model" in name]
    if not layers:
        raise ConfigError(f"no language-model decoder layers found in {type(teacher).__name__}")
    for layer in layers[0]:
        fully_shard(layer)
    setattr(teacher, FSDP_MARK, True)
    return teacher
