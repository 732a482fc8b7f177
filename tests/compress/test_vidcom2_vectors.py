"""VidCom2 core against the official code's outputs (exact indices and budgets in float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from device.compress.vidcom2 import (
    vidcom2_frame_budgets,
    vidcom2_keep_indices,
    vidcom2_scores,
)

VECTORS = Path(__file__).parent / "vectors"
CASES = json.loads((VECTORS / "vidcom2.json").read_text())


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(VECTORS / "vidcom2.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_official(case: dict, arrays: dict[str, np.ndarray]) -> None:
    name, m, r = case["name"], case["tokens_per_frame"], case["keep_ratio"]
    x = torch.from_numpy(arrays[f"{name}/x"])
    assert x.shape == (case["frames"] * m, case["dim"])

    keep = vidcom2_keep_indices(x, m, r)
    assert keep.dtype == torch.int64
    np.testing.assert_array_equal(keep.numpy(), arrays[f"{name}/kept_global"])

    s = vidcom2_scores(x, m, r)
    np.testing.assert_array_equal(s.ks.numpy(), arrays[f"{name}/ks"])
    np.testing.assert_array_equal(vidcom2_frame_budgets(x, m, r).numpy(), arrays[f"{name}/ks"])
    for field in ("vid_score", "frame_score", "frame_uniqueness", "scales"):
        np.testing.assert_allclose(
            getattr(s, field).numpy(), arrays[f"{name}/{field}"], rtol=0, atol=1e-6
        )


def test_vectors_cover_rounding_paths(arrays: dict[str, np.ndarray]) -> None:
    """The vectors include multi-frame cases whose budgets differ between frames."""
    multi = [c for c in CASES if c["frames"] > 1]
    assert multi
    assert any(len(set(arrays[f"{c['name']}/ks"].tolist())) > 1 for c in multi)
