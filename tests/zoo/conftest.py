"""Session fixture: the tiny "test" zoo, trained once per session into a temp cache (~2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def test_zoo(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from shared.models.zoo import ensure_zoo

    torch.set_num_threads(1)
    cache: Path = tmp_path_factory.mktemp("zoo-cache")
    return ensure_zoo("test", cache_dir=cache, evaluate_after=True)
