"""Random uplink selection: the same sample count and token byte budget as UTS budget mode, but
chosen independently of confidence and attention."""

from __future__ import annotations

import pytest
import torch

from device.sampling import SAMPLERS, InferenceRecord, RandomSampler
from device.sampling.uncertainty import token_bytes
from shared.errors import ConfigError


def _rec(sid: str, prob: float, k: int = 40) -> InferenceRecord:
    lp = torch.log(torch.tensor([prob]))
    # attention favours the first tokens; UTS would keep exactly those
    return InferenceRecord(sid, lp, torch.full_like(lp, 0.5), 100,
                           torch.linspace(1.0, 0.0, k), torch.arange(k))


def test_random_matches_uts_budget_but_not_its_choices() -> None:
    opts = {"round_size": 32, "round_budget": 8, "token_budget_bytes": 10 * token_bytes(16, "int8")}
    rand = SAMPLERS.build("random", opts)
    uts = SAMPLERS.build("uts", {**opts, "mode": "budget"})
    assert isinstance(rand, RandomSampler)
    rand.dim = uts.dim = 16
    # confidence rises with the index: UTS takes the 8 least confident, 0..7
    recs = [_rec(f"s{i}", 0.05 + 0.9 * i / 32) for i in range(32)]
    r_sel, u_sel = rand.select(recs), uts.select(recs)
    assert [s.sample_id for s in u_sel] == [f"s{i}" for i in range(8)]
    assert len(r_sel) == len(u_sel) == 8
    assert [s.sample_id for s in r_sel] != [s.sample_id for s in u_sel]
    assert all(s.tokens.numel() == 10 for s in r_sel + u_sel)  # same bytes per sample
    assert any(not torch.equal(s.tokens, torch.arange(10)) for s in r_sel)
    assert all(torch.equal(s.tokens, torch.sort(s.tokens).values) for s in r_sel)
    # keyed by sample id: the same records in another order get the same draw
    again = rand.select(list(reversed(recs)))
    assert sorted(s.sample_id for s in again) == sorted(s.sample_id for s in r_sel)
    other = SAMPLERS.build("random", {**opts, "seed": 1})
    other.dim = 16
    assert {s.sample_id for s in other.select(recs)} != {s.sample_id for s in r_sel}


def test_random_requires_budget_mode() -> None:
    with pytest.raises(ConfigError, match="mode"):
        SAMPLERS.build("random", {"mode": "threshold"})
