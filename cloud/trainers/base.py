"""The worker's pluggable training step: pending samples + the current adapter -> a new adapter.

A Trainer wraps whatever distillation runs on the cloud (AKD with a teacher, or the tiny
feature-distillation trainer used on machines without a model zoo). The worker owns scheduling,
job state, checkpoints, encoding and publishing; the trainer owns only the optimisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from shared.types import UploadSample

StateDict = dict[str, torch.Tensor]


class JobInterrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by `JobContext.checkpoint` when the worker is stopping; the job resumes later."""


class JobContext(Protocol):
    """What a trainer may do with the job it runs: resume and checkpoint."""

    job_id: str

    def restore(self) -> tuple[int, StateDict] | None:
        """(step, tensors) of the last checkpoint of this job, or None for a fresh start."""
        ...

    def checkpoint(self, step: int, tensors: StateDict) -> None:
        """Durably save progress; raises JobInterrupted afterwards when the worker is stopping."""
        ...


@dataclass(frozen=True, slots=True)
class TrainResult:
    """A finished round: the new adapter (same names and shapes as the input) and its figures."""

    adapter: StateDict
    metrics: Mapping[str, float]
    withheld: str | None = None
    """Why the round's adapter must not be published (e.g. it did worse on held-out uploads);
    None: publish it."""


class Trainer(Protocol):
    """Turns uploaded samples into an adapter update for the device-side student."""

    base_model_hash: str
    """sha256 hex of the student base weights the adapters belong to."""

    def initial_adapter(self) -> StateDict:
        """The adapter every device ships with (version 0)."""
        ...

    def check_sample(self, sample: UploadSample) -> None:
        """Refuse (WireFormatError naming the field) a sample this trainer cannot learn from, so
        that it is rejected at upload time instead of failing a round later."""
        ...

    def train(self, adapter: StateDict, samples: Sequence[UploadSample],
              ctx: JobContext) -> TrainResult:
        """Distil into `adapter` (a copy is made) from `samples`; resumable through `ctx`."""
        ...
