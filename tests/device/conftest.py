"""Device-test fixtures: one tiny student checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.device.tiny import write_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("student"))
