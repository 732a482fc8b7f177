"""AKD loss terms as pure functions of tensors (no model code here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of student logits (N, V) against pseudo-label (or reference) tokens (N,)."""
    return F.cross_entropy(logits.float(), targets)


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """KL(teacher_T || student_T) per answer token, averaged over tokens, times T^2.

    student_logits, teacher_logits: (N, V). T^2 keeps gradient scale independent of T (Hinton).
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)  # (N, V)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / student_logits.shape[0]
    return kl * t * t


def feature_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module | None,
) -> torch.Tensor:
    """MSE between projected student features (N, Ds) -> (N, Dt) and teacher features (N, Dt)."""
    s = student_hidden.float() if projection is None else projection(student_hidden.float())
    return F.mse_loss(s, teacher_hidden.float())


class FeatureProjection(nn.Linear):
    """Learned student->teacher hidden map for the feature loss (cloud-only, never shipped).

    Initialised to the identity when the widths match, so equal features give zero loss at step 0.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__(student_dim, teacher_dim)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.weight.copy_(torch.eye(teacher_dim))
                self.bias.zero_()
