"""Pure loss functions used by the distillation methods.

Every function here is stateless and differentiable; the methods in :mod:`pat_hf.methods` combine them with
their weights. Keeping them pure lets the tests check each against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "kl_div_loss"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against hard labels, with optional label smoothing.

    Args:
        logits: Student logits of shape (B, K).
        labels: Class indices of shape (B,).
        label_smoothing: Amount of smoothing in [0, 1).

    Returns:
        A scalar tensor.
    """
    # Computed in float32: under bf16 autocast log-softmax over many classes loses too much precision.
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def kl_div_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation loss ``KL(p_t || p_s) * T**2`` with batch-mean reduction.

    Args:
        student_logits: Logits of shape (B, K); gradients flow through them.
        teacher_logits: Logits of shape (B, K); gradients flow through them too when they require grad
            (PAT's regulariser trains the prompts through the prompted teacher's logits).
        temperature: Softmax temperature T > 0. The T² factor keeps gradient magnitudes independent of T.

    Returns:
        A scalar tensor: the KL divergence summed over classes, averaged over the batch, times T².
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2
