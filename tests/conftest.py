"""Suite-wide fixtures: deterministic seeds, one torch thread (tests share 2 cores with servers)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
