"""Handing an AKD job to a runner: in this process (world size 1) or a `torchrun` job.

The cloud worker exports a job's claimed uploads and start adapter (`export_job`), then calls a
`Launcher`; both launchers run the same `run_job` and return rank 0's result.json. A Kubernetes
launcher would submit the same command (see docs/scaling.md) and read the same files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from cloud.distill import DistillSample
from cloud.distributed.job import RESULT_FILE, run_job
from cloud.distributed.runtime import LaunchEnv, Runtime
from cloud.distributed.samples import save_samples
from cloud.distributed.spec import DistillJobSpec
from shared.errors import CdcaError, ConfigError

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class Launcher(Protocol):
    """Runs a job spec to completion and returns its result.json contents."""

    def run(self, spec: DistillJobSpec) -> dict[str, Any]:
        """Block until the job is done; raise on failure."""
        ...


class InProcessLauncher:
    """World size 1 in the calling process (the embedded cloud-server default)."""

    def run(self, spec: DistillJobSpec) -> dict[str, Any]:
        """`run_job` here, without a process group."""
        runtime = Runtime(LaunchEnv(), spec.backend)
        try:
            return run_job(spec, runtime).to_json()
        finally:
            runtime.close()


class JobFailedError(CdcaError):
    """A launched job exited non-zero; `output` holds the tail of its log."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"distillation job exited with {returncode}: {output[-2000:]}")
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True, slots=True)
class TorchrunLauncher:
    """`torchrun --nproc-per-node N -m cloud.distributed.run --job <spec>` on this machine."""

    nproc_per_node: int = 2
    threads_per_rank: int = 1
    """torch CPU threads of each rank (OMP_NUM_THREADS too)."""
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.threads_per_rank < 1 or not self.timeout_s > 0:
            raise ConfigError(f"`nproc_per_node` and `threads_per_rank` must be >= 1 and "
                              f"`timeout_s` > 0, got {self.nproc_per_node}, "
                              f"{self.threads_per_rank}, {self.timeout_s}")

    def command(self, spec_path: Path, master_port: int) -> list[str]:
        """The launch command (what a Kubernetes Job's container would run per node)."""
        return [sys.executable, "-m", "torch.distributed.run",
                "--nproc-per-node", str(self.nproc_per_node),
                "--master-addr", "127.0.0.1", "--master-port", str(master_port),
                "-m", "cloud.distributed.run", "--job", str(spec_path),
                "--threads", str(self.threads_per_rank)]

    def run(self, spec: DistillJobSpec) -> dict[str, Any]:
        """Write the spec next to the output, launch, wait, read result.json."""
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        spec_path = out / "job.json"
        spec.to_json(spec_path)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads_per_rank),
               "PYTHONPATH": os.pathsep.join(
                   p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        proc = subprocess.run(self.command(spec_path, _free_port()), cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=self.timeout_s)
        if proc.returncode != 0:
            raise JobFailedError(proc.returncode, proc.stdout + proc.stderr)
        result: dict[str, Any] = json.loads((out / RESULT_FILE).read_text())
        return result


def _free_port() -> int:
    # a tiny race (another process may take it before torchrun binds); torchrun then fails
    # fast with "address in use" and the worker retries the job
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REPLAY_PREFIX = "replay/"
"""Prefix of replay sample ids in a samples file, so they never clash with upload ids."""


def export_job(
    template: DistillJobSpec, samples: Sequence[DistillSample], workdir: str | Path,
    adapter: dict[str, torch.Tensor] | None = None, replay: Sequence[DistillSample] = (),
) -> DistillJobSpec:
    """Write a job's inputs under `workdir` (samples file with the uploads and the replay pool,
    start adapter) and return the spec pointing at them; `template` supplies checkpoints,
    cache and hyper-parameters."""
    if not samples:
        raise ConfigError("`samples` is empty; nothing to export")
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    pool = [replace(s, sample_id=f"{REPLAY_PREFIX}{i}/{s.sample_id}")
            for i, s in enumerate(replay)]
    save_samples([*samples, *pool], d / "samples.safetensors")
    adapter_in = None
    if adapter is not None:
        adapter_in = str(d / "adapter_in.safetensors")
        safetensors.torch.save_file(
            {k: v.detach().cpu().contiguous() for k, v in adapter.items()}, adapter_in)
    return replace(template, samples_file=str(d / "samples.safetensors"), sample_ids=(),
                   replay_ids=tuple(s.sample_id for s in pool), adapter_in=adapter_in,
                   output_dir=str(d / "out"))
