"""Student loading on compressed bases, in-place adapter swaps, compressed inference signals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from device.compress import COMPRESSORS
from device.runtime.inference import DeviceInference
from device.runtime.loader import (
    StudentConfig,
    adapter_state,
    load_adapter_state,
    load_student,
    model_bytes,
)
from shared.errors import ConfigError, IncompatibleUpdateError
from shared.media import procedural as P

QUANT_LINEAR = {"bnb8": Linear8bitLt, "bnb4": Linear4bit,
                "int8_dynamic": torch.ao.nn.quantized.dynamic.Linear}


def _run(student, n: int = 2, keep: float = 0.25):
    inf = DeviceInference(student, COMPRESSORS.build("vidcom2", {"keep_ratio": keep}), 3)
    samples = P.batch("source", n, seed=1)
    return inf, inf.run([s.frames for s in samples], [s.question for s in samples],
                        [s.sample_id for s in samples])


@pytest.mark.parametrize("quantization", ["bnb8", "bnb4", "int8_dynamic"])
def test_llm_is_quantized_and_vision_tower_is_not(tiny_ckpt: Path, quantization: str) -> None:
    fp32 = load_student(StudentConfig(tiny_ckpt))
    st = load_student(StudentConfig(tiny_ckpt, quantization=quantization))
    mods = dict(st.model.named_modules())
    qcls = QUANT_LINEAR[quantization]
    llm = [n for n, m in mods.items() if isinstance(m, qcls)]
    assert llm and all(".language_model." in n for n in llm)
    vis = [m for n, m in mods.items() if ".vision_tower." in n or "multi_modal_projector" in n]
    assert vis and not any(isinstance(m, qcls) for m in vis)
    # visual tokens are identical to fp32's: the uploaded feature space does not depend on it
    _, a = _run(fp32)
    _, b = _run(st)
    assert torch.equal(a[0].features, b[0].features) or quantization == "int8_dynamic" and \
        torch.allclose(a[0].features, b[0].features)
    assert model_bytes(st.model) < model_bytes(fp32.model)


def test_inference_signals_are_consistent(tiny_ckpt: Path) -> None:
    st = load_student(StudentConfig(tiny_ckpt))
    inf, res = _run(st, n=3)
    for r in res:
        rec = r.record
        t = rec.token_logprobs.shape[0]
        assert 1 <= t <= 3 and bool((rec.token_logprobs <= 0).all())
        assert bool((rec.token_entropy >= 0).all())
        # 8 frames of an h x w pooled grid + one newline; vidcom2 keeps ~25% of the grid and
        # the newline extra is excluded from what may be uploaded
        f, h, w = r.grid
        n = f * h * w
        assert f == 8 and r.visual_tokens_in == n + 1
        assert abs(rec.keep.numel() - 0.25 * n) <= f and bool((rec.keep < n).all())
        assert bool((rec.keep[1:] > rec.keep[:-1]).all())
        assert r.features.shape == (rec.keep.numel(), 128)
        assert torch.isfinite(rec.token_scores).all() and float(rec.token_scores.sum()) > 0
    # attention rows of the answer sum to <= 1 over all keys, so visual scores are a share
    assert all(float(r.record.token_scores.sum()) <= 1.0 + 1e-5 for r in res)


def test_adapter_replaced_in_place_changes_and_restores(tiny_ckpt: Path) -> None:
    st = load_student(StudentConfig(tiny_ckpt))
    before = adapter_state(st.model)
    _, r0 = _run(st)
    changed = {k: v + 0.05 * torch.randn_like(v) for k, v in before.items()}
    base_id = id(st.model.get_base_model())
    load_adapter_state(st.model, changed)
    _, r1 = _run(st)
    assert id(st.model.get_base_model()) == base_id
    assert not torch.equal(r0[0].record.token_logprobs[:1], r1[0].record.token_logprobs[:1])
    load_adapter_state(st.model, before)
    _, r2 = _run(st)
    assert torch.equal(r0[0].record.token_logprobs, r2[0].record.token_logprobs)
    with pytest.raises(IncompatibleUpdateError, match="differ"):
        load_adapter_state(st.model, dict(list(before.items())[1:]))


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantization"):
        StudentConfig(tmp_path, quantization="int3")
    with pytest.raises(ConfigError, match="config.json"):
        load_student(StudentConfig(tmp_path))


def test_original_positions_scoring_pass(tiny_ckpt: Path) -> None:
    st = load_student(StudentConfig(tiny_ckpt))
    samples = P.batch("blur", 2, seed=3)
    args = ([s.frames for s in samples], [s.question for s in samples], ["a", "b"])
    comp = COMPRESSORS.build("vidcom2", {})
    compact = DeviceInference(st, comp, 3, original_positions=False).run(*args)
    orig = DeviceInference(st, comp, 3, original_positions=True).run(*args)
    for c, o in zip(compact, orig, strict=True):
        assert torch.equal(c.record.keep, o.record.keep)
        assert o.record.token_logprobs.numel() >= 1 and torch.isfinite(o.record.token_scores).all()
    # positions differ, so the scores do (the option is really in effect)
    assert not torch.allclose(compact[0].record.token_scores, orig[0].record.token_scores)
