"""AKD on tiny LLaVA-OneVision models: labels, LoRA-only training, adapter round trip, DWC."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from cloud.distill import (
    DISTILLERS,
    AdapterDistiller,
    AKDConfig,
    DistillSample,
    LoRASpec,
    answer_exact_match,
    attach_lora,
    label,
)
from cloud.distill.akd import _forward, _generate
from cloud.distill.prompt import pack
from shared.codec import CODECS
from shared.errors import ConfigError
from shared.types import UploadSample, VisualTokens
from tests.distill import tiny_pair as tp


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = tp.vlm(layers=3, seed=1)
    fmt = tp.formatter()
    samples = tp.samples(6, seed=2)
    labels = label(teacher, samples, fmt, max_new_tokens=5)
    return teacher, fmt, samples, labels


def _student(seed: int = 3, spec: LoRASpec | None = None):
    torch.manual_seed(seed)  # LoRA A init
    return attach_lora(tp.vlm(layers=1, seed=seed), spec or LoRASpec(rank=4, alpha=8))


@torch.no_grad()
def _answer_logits(model, fmt, samples, labels) -> torch.Tensor:
    model.eval()
    batch = pack(fmt, [s.question for s in samples], [s.visual_tokens.shape[0] for s in samples],
                 [t.answer_ids for t in labels])
    logits, _ = _forward(model, batch, samples)
    return torch.cat([logits[i, p] for i, p in enumerate(batch.answer_positions)])  # (N, V)


def _kl(model, fmt, samples, labels) -> float:
    s = _answer_logits(model, fmt, samples, labels)
    t = torch.cat([lab.logits for lab in labels])
    return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


def test_teacher_labels_are_consistent_greedy_answers(pair) -> None:
    teacher, fmt, samples, labels = pair
    for s, lab in zip(samples, labels, strict=True):
        a = lab.answer_ids.numel()
        assert 1 <= a <= 5
        assert lab.logits.shape == (a, len(fmt.tokenizer))
        assert lab.hidden.shape == (s.visual_tokens.shape[0] + a, tp.HIDDEN)
        # greedy: each answer token is the argmax of the logits that predicted it
        assert torch.equal(lab.logits.argmax(-1), lab.answer_ids)
        if a < 5:
            assert int(lab.answer_ids[-1]) == fmt.eos_id


def test_reference_answers_are_teacher_forced(pair) -> None:
    teacher, fmt, _, _ = pair
    refs = tp.samples(2, seed=5, with_reference=True)
    labs = label(teacher, refs, fmt, prefer_reference=True)
    for s, lab in zip(refs, labs, strict=True):
        assert lab.answer_ids.tolist() == fmt.answer_ids(s.reference_answer)
        assert lab.logits.shape[0] == lab.answer_ids.numel()


def test_kl_only_akd_steps_reduce_kl_and_touch_only_lora(pair) -> None:
    teacher, fmt, samples, labels = pair
    student = _student()
    frozen_before = {k: v.clone() for k, v in student.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in student.state_dict().items() if "lora_" in k}
    kl_before = _kl(student, fmt, samples, labels)
    cfg = AKDConfig(steps=30, batch_size=4, lr=5e-3, temperature=1.0, ce_weight=0.0,
                    feature_weight=0.0)
    result = AdapterDistiller(cfg).fit(student, None, samples, formatter=fmt, labels=labels)
    kl_after = _kl(student, fmt, samples, labels)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    after = student.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"non-LoRA tensor {k} changed"
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items())
    assert len(result.history) == 30
    assert set(result.history[0]) == {"loss", "ce", "kl", "feature"}


def test_default_weights_reduce_every_term(pair) -> None:
    """CE (pseudo-labels) and KL pull a random teacher's flat distribution different ways: the
    combined loss and the CE fall; the KL at T=2 and the feature loss must not blow up."""
    teacher, fmt, samples, labels = pair
    result = AdapterDistiller(AKDConfig(steps=30, batch_size=4, lr=5e-3)).fit(
        _student(), None, samples, formatter=fmt, labels=labels)
    m = result.metrics
    assert m["loss_last"] < 0.6 * m["loss_first"]
    assert m["ce_last"] < 0.5 * m["ce_first"]
    assert m["feature_last"] < m["feature_first"]


def test_adapter_has_only_lora_keys_and_round_trips(pair) -> None:
    teacher, fmt, samples, labels = pair
    student = _student()
    result = DISTILLERS.build("akd", {"steps": 5, "batch_size": 2}).fit(
        student, teacher, samples[:2], formatter=fmt)
    assert result.adapter and all("lora_" in k for k in result.adapter)
    fresh = _student(seed=3)
    out = set_peft_model_state_dict(fresh, result.adapter)
    assert not out.unexpected_keys
    assert not [k for k in out.missing_keys if "lora_" in k]
    torch.testing.assert_close(_answer_logits(fresh, fmt, samples, labels),
                               _answer_logits(student, fmt, samples, labels))


def test_dwc_delta_of_the_adapter_gives_nearly_the_same_logits_on_device(pair) -> None:
    teacher, fmt, samples, labels = pair
    cloud_student = _student()
    device_student = _student()  # same seed: the device holds the same initial adapter
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(device_student).items()}
    cfg = AKDConfig(steps=20, batch_size=4, lr=5e-3)
    result = AdapterDistiller(cfg).fit(cloud_student, None, samples, formatter=fmt, labels=labels)
    codec = CODECS.build("dwc", {"energy_share": 0.995, "bits": 8})
    enc = codec.encode(result.adapter, initial)
    dense = CODECS.build("dense-fp16").encode(result.adapter, initial)
    new_adapter = codec.decode(enc.payload, initial)
    set_peft_model_state_dict(device_student, new_adapter)
    want = _answer_logits(cloud_student, fmt, samples, labels)
    got = _answer_logits(device_student, fmt, samples, labels)
    before = _answer_logits(_student(), fmt, samples, labels)
    err = float((got - want).abs().max())
    moved = float((before - want).abs().max())
    assert err < 0.1 * moved, (err, moved)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert enc.stats.payload_bytes < dense.stats.payload_bytes


def test_replay_and_cached_labels_without_teacher(pair) -> None:
    teacher, fmt, samples, labels = pair
    replay = tp.samples(3, seed=9, with_reference=True)
    replay_labels = label(teacher, replay, fmt)
    student = _student()
    result = AdapterDistiller(AKDConfig(steps=3, batch_size=4, replay_ratio=0.5)).fit(
        student, None, samples, formatter=fmt, labels=labels, replay=replay,
        replay_labels=replay_labels)
    assert result.metrics["replay_samples"] == 3.0
    with pytest.raises(ConfigError, match="teacher"):
        AdapterDistiller(AKDConfig(steps=1)).fit(student, None, samples, formatter=fmt)
    with pytest.raises(ConfigError, match="labels"):
        AdapterDistiller(AKDConfig(steps=1)).fit(student, None, samples, formatter=fmt,
                                                 labels=labels[:2])


def test_projector_lora_trains_on_pre_projector_tokens(pair) -> None:
    teacher, fmt, _, _ = pair
    student = _student(spec=LoRASpec(rank=2, include_projector=True))
    # the zoo shares the projector between teacher and student; do the same here
    src = dict(teacher.model.multi_modal_projector.named_parameters())
    base = student.base_model.model.model.multi_modal_projector
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" not in name:
                p.copy_(src[name.replace("base_layer.", "")])
    g = torch.Generator().manual_seed(4)
    vis = [DistillSample(question="how many shapes are there", feature_space="vision",
                         visual_tokens=torch.randn(5, 16, generator=g)) for _ in range(3)]
    proj_b = {k: v.clone() for k, v in student.state_dict().items()
              if "multi_modal_projector" in k and "lora_B" in k}
    assert proj_b
    AdapterDistiller(AKDConfig(steps=4, batch_size=2, lr=1e-2)).fit(
        student, teacher, vis, formatter=fmt)
    after = student.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in proj_b.items())


def test_misuse_is_a_config_error(pair) -> None:
    teacher, fmt, samples, labels = pair
    with pytest.raises(ConfigError, match="replay_ratio"):
        AKDConfig(replay_ratio=1.0)
    with pytest.raises(ConfigError, match="temperature"):
        AKDConfig(temperature=0)
    plain = tp.vlm(layers=1, seed=3)
    with pytest.raises(ConfigError, match="trainable"):
        AdapterDistiller(AKDConfig(steps=1)).fit(plain, None, samples, formatter=fmt,
                                                 labels=labels)
    wrong = [DistillSample(question="how many", visual_tokens=torch.randn(3, 7))]
    with pytest.raises(ConfigError, match="width"):
        AdapterDistiller(AKDConfig(steps=1)).fit(_student(), teacher, wrong, formatter=fmt)
    with pytest.raises(ConfigError, match="visual_tokens"):
        DistillSample(question="x", visual_tokens=torch.randn(3))


def test_resume_sees_the_same_batches_and_on_step_can_stop(pair) -> None:
    _, fmt, samples, labels = pair
    cfg = AKDConfig(steps=6, batch_size=2, lr=5e-3)
    seen: list[int] = []

    class Stop(Exception):
        pass

    def stop_at_3(step, parts) -> None:
        seen.append(step)
        if step == 2:
            raise Stop

    student = _student()
    with pytest.raises(Stop):
        AdapterDistiller(cfg).fit(student, None, samples, formatter=fmt, labels=labels,
                                  on_step=stop_at_3)
    assert seen == [0, 1, 2]
    # with a negligible lr the losses depend only on the batch drawn: resumed == uninterrupted
    still = AKDConfig(steps=6, batch_size=2, lr=1e-12, projection_lr=1e-12)
    full = AdapterDistiller(still).fit(_student(), None, samples, formatter=fmt, labels=labels)
    resumed = AdapterDistiller(still).fit(_student(), None, samples, formatter=fmt,
                                          labels=labels, start_step=3)
    assert len(resumed.history) == 3
    assert len({round(h["ce"], 4) for h in full.history}) > 1  # batches differ step to step
    for a, b in zip(full.history[3:], resumed.history, strict=True):
        assert abs(a["ce"] - b["ce"]) < 1e-4


def test_from_upload_dequantizes_int8_tokens() -> None:
    values = np.array([[10, -20], [127, 0], [1, 1]], dtype=np.int8)
    scales = np.array([0.1, 0.01, 1.0], dtype=np.float32)
    up = UploadSample(sample_id="u1", media_kind="video", question="how many shapes",
                      device_answer="two", confidence=0.3,
                      tokens=VisualTokens(values, np.array([0, 4, 9]), (1, 2, 5), "projected",
                                          scales))
    s = DistillSample.from_upload(up, reference_answer="three")
    torch.testing.assert_close(s.visual_tokens,
                               torch.tensor([[1.0, -2.0], [1.27, 0.0], [1.0, 1.0]]))
    assert s.positions.tolist() == [0, 4, 9] and s.grid == (1, 2, 5)
    assert s.sample_id == "u1" and s.reference_answer == "three"
    with pytest.raises(ConfigError, match="feature_space"):
        DistillSample.from_upload(UploadSample("u2", "video", "q", "", 0.1, tokens=VisualTokens(
            values.astype(np.float16), np.arange(3), (1, 1, 3), "tiny/features")))
    with pytest.raises(ConfigError, match="no visual tokens"):
        DistillSample.from_upload(UploadSample("u3", "video", "q", "", 0.1))


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def test_budgeted_round_changes_exactly_k_entries_and_still_learns(pair) -> None:
    _, fmt, samples, labels = pair
    student = _student()
    v0 = {k: v.clone() for k, v in get_peft_model_state_dict(student).items()}
    total = sum(v.numel() for v in v0.values())
    cfg = AKDConfig(steps=20, batch_size=4, lr=5e-3, delta_entries=40, saliency_batches=3)
    result = AdapterDistiller(cfg).fit(student, None, samples, formatter=fmt, labels=labels)
    changed = sum(int((d != 0).sum()) for d in _delta(result.adapter, v0).values())
    assert 0 < changed <= 40 < total // 10
    assert result.metrics["ce_last"] < result.metrics["ce_first"]


def test_budgeted_round_on_an_applied_update_moves_only_lora_b(pair) -> None:
    """After an update made B non-zero, A has gradients too; a budgeted round still leaves it."""
    _, fmt, samples, labels = pair
    student = _student()
    dense = AdapterDistiller(AKDConfig(steps=20, batch_size=4, lr=5e-2)).fit(
        student, None, samples, formatter=fmt, labels=labels)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in dense.adapter.items())
    cfg = AKDConfig(steps=5, batch_size=4, lr=5e-3, delta_entries=30, saliency_batches=2)
    result = AdapterDistiller(cfg).fit(student, None, samples, formatter=fmt, labels=labels)
    delta = _delta(result.adapter, dense.adapter)
    assert all(not d.any() for k, d in delta.items() if ".lora_A." in k)
    assert 0 < sum(int((d != 0).sum()) for d in delta.values()) <= 30


def test_b_only_round_leaves_lora_a_and_restores_its_trainability(pair) -> None:
    """`train_lora_a=False`: a dense round moves every B matrix and no A entry, and A trains
    again in the next round (the in-process trainer reuses one student)."""
    _, fmt, samples, labels = pair
    student = _student()
    dense = AdapterDistiller(AKDConfig(steps=20, batch_size=4, lr=5e-2)).fit(
        student, None, samples, formatter=fmt, labels=labels)
    b_only = AdapterDistiller(AKDConfig(steps=10, batch_size=4, lr=5e-3, train_lora_a=False)).fit(
        student, None, samples, formatter=fmt, labels=labels)
    delta = _delta(b_only.adapter, dense.adapter)
    assert all(not d.any() for k, d in delta.items() if ".lora_A." in k)
    assert all(d.any() for k, d in delta.items() if ".lora_B." in k)
    assert all(p.requires_grad for n, p in student.named_parameters() if ".lora_A." in n)
    again = AdapterDistiller(AKDConfig(steps=5, batch_size=4, lr=5e-3)).fit(
        student, None, samples, formatter=fmt, labels=labels)
    assert any(d.any() for k, d in _delta(again.adapter, b_only.adapter).items()
               if ".lora_A." in k)


def test_budgeted_round_avoids_entries_the_source_replay_leans_on(pair) -> None:
    teacher, fmt, samples, labels = pair
    replay = tp.samples(8, seed=11, with_reference=True)
    replay_labels = label(teacher, replay, fmt)
    # the source task's squared gradient (CE on the replay answers) of each LoRA entry at v0
    student = _student()
    v0 = {k: v.clone() for k, v in get_peft_model_state_dict(student).items()}
    batch = pack(fmt, [s.question for s in replay], [s.visual_tokens.shape[0] for s in replay],
                 [t.answer_ids for t in replay_labels])
    out, _ = _forward(student, batch, replay)
    picked = torch.cat([out[i, p] for i, p in enumerate(batch.answer_positions)])  # (N, V)
    torch.nn.functional.cross_entropy(picked, torch.cat(batch.answer_ids)).backward()
    fisher = {k.replace(".default", ""): p.grad.square() for k, p in student.named_parameters()
              if p.requires_grad and p.grad is not None}

    def source_mass(penalty: float) -> float:
        cfg = AKDConfig(steps=3, batch_size=4, lr=5e-3, delta_entries=30, saliency_batches=3,
                        replay_ratio=0.5, source_penalty=penalty)
        result = AdapterDistiller(cfg).fit(_student(), None, samples, formatter=fmt,
                                           labels=labels, replay=replay,
                                           replay_labels=replay_labels)
        chosen = _delta(result.adapter, v0)
        assert 0 < sum(int((d != 0).sum()) for d in chosen.values()) <= 30
        return sum(float(fisher[k][d != 0].sum()) for k, d in chosen.items())

    assert 0 < source_mass(1e4) < 0.5 * source_mass(0.0)  # measured: 20x less


def test_budgeted_resume_ranks_against_the_round_base(pair) -> None:
    """A resumed round (student restored mid-round, `base` given) trains the same entries."""
    _, fmt, samples, labels = pair
    cfg = AKDConfig(steps=6, batch_size=2, lr=5e-3, delta_entries=25, saliency_batches=2)
    student = _student()
    v0 = {k: v.clone() for k, v in get_peft_model_state_dict(student).items()}
    full = AdapterDistiller(cfg).fit(student, None, samples, formatter=fmt, labels=labels)
    mid = AdapterDistiller(dataclasses.replace(cfg, steps=3)).fit(
        _student(), None, samples, formatter=fmt, labels=labels)
    restored = _student()
    set_peft_model_state_dict(restored, mid.adapter)
    resumed = AdapterDistiller(cfg).fit(restored, None, samples, formatter=fmt, labels=labels,
                                        start_step=3, base=v0)
    for k, d in _delta(resumed.adapter, v0).items():
        assert not ((d != 0) & (_delta(full.adapter, v0)[k] == 0)).any(), k


def test_top_entries_picks_the_k_largest_across_tensors() -> None:
    from cloud.distill.sparse_delta import top_entries

    masks = top_entries([torch.tensor([[0.1, 5.0], [0.2, 0.0]]), torch.tensor([3.0, 0.3, 4.0])], 3)
    assert masks[0].tolist() == [[False, True], [False, False]]
    assert masks[1].tolist() == [True, False, True]
    assert sum(int(m.sum()) for m in top_entries([torch.ones(4), torch.ones(3)], 5)) == 5
    with pytest.raises(ValueError, match="k"):
        top_entries([torch.ones(2)], -1)


def test_exact_match_equals_greedy_decoding(pair) -> None:
    teacher, fmt, _, _ = pair
    samples = tp.samples(12, seed=9)
    own, truth = [], []
    for s in samples:  # the teacher's own greedy answers, cut to 2 tokens (some then go on)
        g = _generate(teacher, fmt, s, max_new_tokens=2).tolist()
        own.append(fmt.tokenizer.decode([t for t in g if t != fmt.eos_id]))
        ids = fmt.answer_ids(own[-1])
        truth.append(_generate(teacher, fmt, s, max_new_tokens=len(ids)).tolist() == ids)
    assert 0 < sum(truth) < len(truth)  # both cases occur
    assert answer_exact_match(teacher, samples, own, fmt) == sum(truth) / len(truth)
    wrong = [a + " red" for a in own]  # greedy stops (or goes on) where these do not
    assert answer_exact_match(teacher, samples, wrong, fmt, batch_size=5) == 0.0
    assert teacher.training is False
