"""bench.device_uplink budget mode: the real sampler's per-round selection, scored against the
stream's wrong answers (a confident-when-right device reaches the ceiling, an uninformative one
stays at 1x)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.device_uplink import budget_part
from device.sampling.base import InferenceRecord


def _stream(n: int, wrong_every: int, informative: bool):
    res, items = [], []
    for i in range(n):
        wrong = i % wrong_every == 0
        p = 0.3 if (wrong and informative) else 0.9 - 0.001 * i  # distinct confidences
        rec = InferenceRecord(f"s{i}", torch.tensor([float(torch.tensor(p).log())]),
                              torch.tensor([0.5]), 10, torch.ones(2), torch.arange(2))
        res.append(SimpleNamespace(answer="red" if not wrong else "blue", record=rec,
                                   features=torch.zeros(2, 8)))
        items.append(SimpleNamespace(answer="red"))
    return res, items


@pytest.mark.parametrize(("informative", "expect"), [(True, 3.0), (False, 1.0)])
def test_budget_mode_enrichment(informative: bool, expect: float) -> None:
    res, items = _stream(90, 3, informative)  # a third wrong: the ceiling is 3x
    out = budget_part(res, items, round_size=30, round_budgets=[6], seed=0)
    row = out["signals"]["logprob"][0]
    assert row["uploaded"] == 18 and row["upload_rate"] == pytest.approx(0.2)
    # uninformative: the least confident are the last 6 of each round, a third of them wrong
    assert row["enrichment"] == pytest.approx(expect)
