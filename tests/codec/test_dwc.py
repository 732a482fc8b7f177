"""DWC and dense-fp16 codec invariants (property tests with hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import CODECS, DWCConfig, DynamicDeltaCodec
from shared.errors import ConfigError, IncompatibleUpdateError

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def state_pairs(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base adapter and a new one: random shapes, scales and sparsity of the change."""
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base, new = {}, {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=2)))
        scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 30.0]))
        dense = draw(st.booleans())
        b = torch.randn(shape, generator=g)
        d = torch.randn(shape, generator=g) * scale
        if not dense:
            d = d * (torch.rand(shape, generator=g) < 0.1)
        base[f"layer.{i}.lora_A.weight"] = b
        new[f"layer.{i}.lora_A.weight"] = b + d
    return base, new


def _block_bound(delta: torch.Tensor, idx: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Per kept entry, half a quantization step of its block: the round-trip error bound."""
    v = delta.flatten()[idx]
    qmax = 127 if bits == 8 else 7
    pad = (-v.numel()) % block
    blocks = torch.nn.functional.pad(v, (0, pad)).view(-1, block)
    step = blocks.abs().amax(1) / qmax  # (nb,)
    return step.repeat_interleave(block)[: v.numel()] / 2


@_SETTINGS
@given(pair=state_pairs(), bits=st.sampled_from([8, 4]), share=st.sampled_from([0.5, 0.9, 1.0]),
       block=st.sampled_from([1, 16, 64]))
def test_round_trip_within_quantization_bound_and_energy_share(pair, bits, share, block) -> None:
    base, new = pair
    codec = DynamicDeltaCodec(DWCConfig(energy_share=share, bits=bits, block_size=block))
    enc = codec.encode(new, base)
    out = codec.decode(enc.payload, base)
    assert set(out) == set(base)
    for name in base:
        delta = (new[name] - base[name]).flatten()
        got = (out[name] - base[name]).flatten()
        sent = enc.stats.tensors[name].kept
        # only sent entries change; what changed is exactly what the residual says was applied
        assert int((got != 0).sum()) <= sent
        tol = 1e-6 * (base[name].abs().flatten() + delta.abs()) + 1e-12
        assert bool(((got - (delta - enc.residual[name].flatten())).abs() <= tol).all())
        if float((delta.double() ** 2).sum()) > 0.0:
            assert enc.stats.tensors[name].energy_share >= share - 1e-9
    # residual identity: new == decoded + residual (up to float32 rounding)
    for name in base:
        rebuilt = out[name] + enc.residual[name]
        atol = 1e-5 * float(new[name].abs().max())
        assert torch.allclose(rebuilt, new[name], rtol=1e-5, atol=atol)


@_SETTINGS
@given(pair=state_pairs(), bits=st.sampled_from([8, 4]), block=st.sampled_from([1, 32]))
def test_quantization_error_bounded_per_block(pair, bits, block) -> None:
    base, new = pair
    codec = DynamicDeltaCodec(DWCConfig(energy_share=1.0, bits=bits, block_size=block))
    enc = codec.encode(new, base)
    for name in base:
        delta = (new[name].double() - base[name].double()).flatten().float()
        res = enc.residual[name].flatten()
        idx = torch.nonzero(delta).flatten()  # share 1.0 keeps every non-zero entry
        bound = _block_bound(delta, idx, bits, block)
        assert bool((res[idx].abs() <= bound * (1 + 1e-4) + 1e-6 * delta[idx].abs()).all())


def test_zero_delta_returns_base_exactly_in_its_dtype() -> None:
    base = {"a": torch.randn(7, 5).to(torch.bfloat16), "b": torch.randn(3).half(),
            "c": torch.randn(4)}
    for name in CODECS.names():
        codec = CODECS.build(name)
        enc = codec.encode(base, base)
        out = codec.decode(enc.payload, base)
        for k, v in base.items():
            assert out[k].dtype == v.dtype and torch.equal(out[k], v)
            assert out[k] is not v  # never aliases the caller's tensors
        assert enc.stats.relative_error == 0.0


@_SETTINGS
@given(pair=state_pairs(), budget=st.integers(200, 4000), bits=st.sampled_from([8, 4]))
def test_byte_budget_is_never_exceeded(pair, budget, bits) -> None:
    base, new = pair
    codec = DynamicDeltaCodec(DWCConfig(energy_share=1.0, budget_bytes=budget, bits=bits))
    try:
        enc = codec.encode(new, base)
    except ConfigError as e:  # only when even an empty payload is larger than the budget
        assert "empty payload" in str(e)
        return
    assert len(enc.payload) <= budget
    assert enc.stats.payload_bytes == len(enc.payload)
    codec.decode(enc.payload, base)


def test_budget_goes_to_high_energy_tensors() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"big": torch.zeros(4000), "small": torch.zeros(4000)}
    new = {"big": torch.randn(4000, generator=g), "small": 0.01 * torch.randn(4000, generator=g)}
    unlimited = DynamicDeltaCodec(DWCConfig(energy_share=0.99)).encode(new, base)
    budget = unlimited.stats.payload_bytes // 3
    enc = DynamicDeltaCodec(DWCConfig(energy_share=0.99, budget_bytes=budget)).encode(new, base)
    assert enc.stats.budget_limited and len(enc.payload) <= budget
    assert enc.stats.tensors["big"].kept > 10 * enc.stats.tensors["small"].kept
    # the budget is used, not wasted: at least half of it carries data
    assert len(enc.payload) > budget // 2


def test_error_feedback_makes_applied_updates_track_the_cloud_model() -> None:
    """20 rounds of small steps; with feedback the device-cloud gap stays at one round's error."""
    g = torch.Generator().manual_seed(2)
    shape = (64, 64)
    target = torch.randn(shape, generator=g)
    cfg = DWCConfig(energy_share=0.5, bits=4)
    gaps = {}
    for feedback in (True, False):
        codec = DynamicDeltaCodec(cfg)
        cloud_prev = {"w": target.clone()}
        device = {"w": target.clone()}
        residual = None
        cloud = target.clone()
        for r in range(20):
            step = 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(100 + r))
            cloud = cloud + step
            enc = codec.encode({"w": cloud}, cloud_prev, residual if feedback else None)
            device = codec.decode(enc.payload, device)
            cloud_prev = {"w": cloud.clone()}
            residual = enc.residual
        gaps[feedback] = float((device["w"] - cloud).norm() / (cloud - target).norm())
    # without feedback the unsent half of the energy of every round accumulates
    assert gaps[True] < 0.5 * gaps[False]
    assert gaps[True] < 0.5


def test_mirror_base_needs_no_residual() -> None:
    """Encoding against an exact mirror of the device state converges without a residual."""
    g = torch.Generator().manual_seed(3)
    cloud = {"w": torch.randn(200, generator=g)}
    device = {"w": torch.zeros(200)}
    codec = DynamicDeltaCodec(DWCConfig(energy_share=0.6, bits=8))
    for _ in range(12):
        enc = codec.encode(cloud, device)
        device = codec.decode(enc.payload, device)
    assert float((device["w"] - cloud["w"]).norm() / cloud["w"].norm()) < 0.01


def test_heavy_tailed_delta_compresses_far_below_dense() -> None:
    g = torch.Generator().manual_seed(4)
    base = {f"t{i}": torch.randn(256, 64, generator=g) for i in range(4)}
    new = {k: v + 0.01 * torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()}
    dwc = CODECS.build("dwc", {"energy_share": 0.9}).encode(new, base)
    dense = CODECS.build("dense-fp16").encode(new, base)
    assert dwc.stats.payload_bytes * 8 < dense.stats.payload_bytes
    # dropping 10% of the energy costs sqrt(0.1) relative error; int8 adds little on top
    assert dwc.stats.relative_error < 1.1 * math.sqrt(0.1)
    assert dense.stats.relative_error < 1e-3


@pytest.mark.parametrize("bad", [
    {"energy_share": 0.0}, {"energy_share": 1.5}, {"bits": 2}, {"block_size": 0},
    {"budget_bytes": 0}, {"zstd_level": 0},
])
def test_config_validation_names_the_field(bad) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        CODECS.build("dwc", bad)


def test_mismatched_state_dicts_are_rejected() -> None:
    codec = CODECS.build("dwc")
    a = {"w": torch.zeros(3)}
    with pytest.raises(IncompatibleUpdateError, match="same tensors"):
        codec.encode({"v": torch.zeros(3)}, a)
    with pytest.raises(IncompatibleUpdateError, match="shape"):
        codec.encode({"w": torch.zeros(4)}, a)
    with pytest.raises(IncompatibleUpdateError, match="non-finite"):
        codec.encode({"w": torch.tensor([0.0, float("nan"), 0.0])}, a)
    with pytest.raises(IncompatibleUpdateError, match="residual"):
        codec.encode(a, a, residual={"x": torch.zeros(3)})


def test_full_energy_share_keeps_only_nonzero_entries() -> None:
    """energy_share 1.0 on a sparse delta sends exactly its non-zero entries, however the
    cumulative energy rounds."""
    g = torch.Generator().manual_seed(0)
    base = {f"t{i}": torch.randn(64, 48, generator=g) for i in range(6)}
    new = {k: v.clone() for k, v in base.items()}
    for i, k in enumerate(new):
        flat = new[k].view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:50 + i]] += 0.01 * torch.randn(
            50 + i, generator=g)
    enc = CODECS.build("dwc", {"energy_share": 1.0}).encode(new, base)
    assert enc.stats.kept == sum(50 + i for i in range(6))
