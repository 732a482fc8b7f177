"""AKD loss terms: zero at agreement, positive otherwise, the T^2 scaling, and gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cloud.distill import losses


def test_kl_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    logits = torch.randn(7, 50)
    for t in (0.5, 1.0, 4.0):
        assert float(losses.distillation_kl(logits, logits.clone(), t)) < 1e-6
    assert float(losses.distillation_kl(logits, torch.randn(7, 50), 2.0)) > 0.01


def test_kl_matches_definition_with_t_squared_scaling() -> None:
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    temp = 3.0
    p_t = F.softmax(t / temp, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert math.isclose(float(losses.distillation_kl(s, t, temp)), float(manual), rel_tol=1e-5)


def test_feature_mse_zero_with_identity_projection_and_trainable() -> None:
    h = torch.randn(9, 32)
    proj = losses.FeatureProjection(32, 32)
    assert float(losses.feature_mse(h, h.clone(), proj).detach()) < 1e-10
    assert float(losses.feature_mse(h, h.clone(), None)) == 0.0
    wide = losses.FeatureProjection(32, 48)
    target = torch.randn(9, 48)
    loss = losses.feature_mse(h, target, wide)
    loss.backward()
    assert wide.weight.grad is not None and float(wide.weight.grad.abs().sum()) > 0


def test_cross_entropy_is_standard() -> None:
    logits, targets = torch.randn(5, 11), torch.randint(0, 11, (5,))
    assert torch.allclose(losses.answer_cross_entropy(logits, targets),
                          F.cross_entropy(logits, targets))
