"""UTS sampler: length-normalised confidence, calibrated threshold, budget, token byte budget."""

from __future__ import annotations

import math

import pytest
import torch

from device.sampling import SAMPLERS, InferenceRecord
from device.sampling.payload import pack_tokens, quantize_int8
from device.sampling.uncertainty import (
    UncertaintySampler,
    UncertaintySamplerConfig,
    sequence_confidence,
    token_bytes,
    tokens_within_budget,
)
from shared.errors import ConfigError
from shared.types import SampleBatch, UploadSample
from shared.wire import convert


def _rec(sid: str, probs: list[float], scores: list[float] | None = None) -> InferenceRecord:
    lp = torch.log(torch.tensor(probs))
    scores = scores or [0.1] * 10
    return InferenceRecord(sid, lp, torch.full_like(lp, 0.5), 100, torch.tensor(scores),
                           torch.arange(len(scores)) * 2)


def test_confidence_is_length_normalised() -> None:
    short = _rec("a", [0.8])
    long = _rec("b", [0.8] * 6)
    s = UncertaintySampler(UncertaintySamplerConfig(threshold=0.5), dim=16)
    # the official product of probabilities calls the long answer far less confident
    assert math.prod([0.8] * 6) < 0.3
    assert s.confidence(short) == pytest.approx(0.8) == pytest.approx(s.confidence(long))
    ent = sequence_confidence(torch.zeros(2), torch.tensor([math.log(100)] * 2), 100, "entropy")
    assert ent == pytest.approx(0.0)


def test_threshold_needs_calibration_and_quantile_sets_it() -> None:
    s = SAMPLERS.build("uts", {"calibration_quantile": 0.25})
    s.dim = 16
    with pytest.raises(ConfigError, match="calibrate"):
        s.select([_rec("a", [0.5])])
    cal = s.calibrated([0.1, 0.2, 0.3, 0.4, 0.5])
    assert cal.config.threshold == pytest.approx(0.2)
    got = cal.select([_rec("x", [0.15]), _rec("y", [0.9]), _rec("z", [0.19])])
    assert [g.sample_id for g in got] == ["x", "z"]


def test_budget_mode_takes_least_confident() -> None:
    s = UncertaintySampler(UncertaintySamplerConfig(mode="budget", round_size=4, round_budget=2),
                           dim=16)
    recs = [_rec(str(i), [p]) for i, p in enumerate([0.9, 0.2, 0.5, 0.1])]
    assert [g.sample_id for g in s.select(recs)] == ["1", "3"]


def test_token_budget_keeps_highest_scores_in_order() -> None:
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05])
    per = token_bytes(16, "int8")
    assert per == 16 + 4 + 8
    idx = tokens_within_budget(scores, per, budget_bytes=2 * per + 5)
    assert idx.tolist() == [1, 3]
    assert tokens_within_budget(scores, per, budget_bytes=1).tolist() == [1]  # min_tokens
    assert tokens_within_budget(scores, per, budget_bytes=10**6).tolist() == [0, 1, 2, 3, 4]


def test_int8_payload_round_trip_and_wire_size() -> None:
    feats = torch.randn(6, 32) * 3
    q, sc = quantize_int8(feats)
    err = (torch.from_numpy(q).float() * torch.from_numpy(sc)[:, None] - feats).abs()
    assert float((err / torch.from_numpy(sc)[:, None]).max()) <= 0.5 + 1e-4
    vt = pack_tokens(feats, torch.tensor([0, 3, 9, 10, 40, 71]), (8, 3, 3), "x/y", "int8")
    s = UploadSample("s", "video", "q", "a", 0.3, tokens=vt)
    wire = len(convert.encode_sample_batch(SampleBatch(0, (s,))))
    assert 6 * token_bytes(32, "int8") <= wire <= 6 * token_bytes(32, "int8") + 120


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match="signal"):
        UncertaintySamplerConfig(signal="variance")
    with pytest.raises(ConfigError, match="round_budget"):
        UncertaintySamplerConfig(round_size=2, round_budget=3)
    with pytest.raises(ConfigError, match="unknown option"):
        SAMPLERS.build("uts", {"bogus": 1})
