"""SparseVLM core against the official code's outputs (v1.5 / main1_0, CPU float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from device.compress.sparsevlm import (
    cluster_count,
    keep_top,
    recycle,
    recycle_selection,
    select_raters,
    visual_scores,
)

VECTORS = Path(__file__).parent / "vectors"
CASES = json.loads((VECTORS / "sparsevlm.json").read_text())
STEPS = [(c, s) for c in CASES for s in c["steps"]]


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(VECTORS / "sparsevlm.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_raters(case: dict, arrays: dict[str, np.ndarray]) -> None:
    name = case["name"]
    raters = select_raters(t(arrays[f"{name}/visual_embeds"]), t(arrays[f"{name}/text_embeds"]))
    assert raters.dtype == torch.int64
    np.testing.assert_array_equal(raters.numpy(), arrays[f"{name}/raters"])


@pytest.mark.parametrize("step", [s for _, s in STEPS], ids=[s["key"] for _, s in STEPS])
def test_scores_and_kept(step: dict, arrays: dict[str, np.ndarray]) -> None:
    key = step["key"]
    scores = visual_scores(t(arrays[f"{key}/attn_rows"]), step["visual_start"],
                           step["visual_count"])
    np.testing.assert_allclose(scores.numpy(), arrays[f"{key}/scores"], rtol=0, atol=1e-5)
    kept = keep_top(scores, step["k"])
    np.testing.assert_array_equal(kept.numpy(), arrays[f"{key}/kept"])


@pytest.mark.parametrize("step", [s for _, s in STEPS], ids=[s["key"] for _, s in STEPS])
def test_recycling(step: dict, arrays: dict[str, np.ndarray]) -> None:
    key = step["key"]
    assert step["recycled"]
    hidden, scores = t(arrays[f"{key}/pruned_hidden"]), t(arrays[f"{key}/pruned_scores"])
    chosen = recycle_selection(scores)
    np.testing.assert_array_equal(chosen.numpy(), arrays[f"{key}/stage2"])
    assert cluster_count(chosen.shape[0]) == step["clusters"]
    merged = recycle(hidden, scores)
    assert merged.shape == (step["clusters"], hidden.shape[1])
    np.testing.assert_allclose(merged.numpy(), arrays[f"{key}/recycled_tokens"], rtol=0,
                               atol=1e-5)


def test_vectors_cover_multi_cluster() -> None:
    """At least one step clusters into c > 1 groups (exercises DPC-kNN, not just a mean)."""
    assert any(s["clusters"] > 1 for _, s in STEPS)
