"""Pure loss functions used by the distillation methods.

Every function here is stateless and differentiable; the methods in :mod:`pat_hf.methods` combine them with
their weights. Keeping them pure lets the tests check each against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "hcl_loss", "kl_div_loss", "ofa_loss"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against class indices (with optional label smoothing) or soft targets.

    Args:
        logits: Student logits of shape (B, K).
        labels: Class indices of shape (B,), or soft targets of shape (B, K) (rows summing to 1, e.g. timm's
            Mixup / CutMix targets).
        label_smoothing: Amount of smoothing in [0, 1), applied to class indices only: soft targets are used
            as given (timm's ``Mixup`` already smoothed them with its ``label_smoothing``; smoothing them again
            would count it twice).

    Returns:
        A scalar tensor: ``-Σ_k y_k log softmax(z)_k`` averaged over the batch.
    """
    # Computed in float32: under bf16 autocast log-softmax over many classes loses too much precision.
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        return -(labels.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
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


def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    epsilon: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """OFA-KD's loss (Hao et al., NeurIPS 2023), batch mean of ``-Σ_c [(p_t,c + m_c)^ε − m_c] · log p_s,c``.

    ``p_t`` are the teacher's probabilities, ``m`` the one-hot target (zero without labels), ε ≥ 1 sharpens
    the target class's share. With ε = 1 it is cross-entropy against the teacher's soft labels. Soft targets
    (B, K) (Mixup / CutMix) give ``m`` the one-hot of their largest entry, as the official OFA-KD code does.

    Args:
        student_logits: (B, K) logits of the student (or of a branch head).
        teacher_logits: (B, K) teacher logits (no gradient is taken through them).
        labels: (B,) class indices, (B, K) soft targets (their argmax is the target class), or None.
        epsilon: The exponent ε.
        temperature: Softmax temperature applied to both sides.

    Returns:
        A scalar tensor.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if labels is None:
        target = p_t if epsilon == 1 else p_t.pow(epsilon)
    else:
        if labels.is_floating_point():  # mixed targets: the official code takes the argmax class
            labels = labels.argmax(dim=-1)
        mask = F.one_hot(labels, num_classes=p_t.shape[-1]).to(p_t.dtype)
        target = p_t + mask if epsilon == 1 else (p_t + mask).pow(epsilon)
        target = target - mask
    return -(target * log_p_s).sum(dim=-1).mean()


def hcl_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """ReviewKD's hierarchical context loss between two (B, C, H, W) maps.

    ``[MSE(a, f) + 0.5·MSE(pool4) + 0.25·MSE(pool2) + 0.125·MSE(pool1)] / 1.875`` where ``poolk`` is adaptive
    average pooling to k×k. A level with ``k >= H`` is skipped and, as in ReviewKD, the halving weights and
    their sum count only the levels used (a 4×4 map: ``[MSE + 0.5·pool2 + 0.25·pool1] / 1.75``). Mean; raw
    features, no normalisation (as published). Gradients flow into both arguments.

    Args:
        student_feature: (B, C, H, W) aligned student feature.
        teacher_feature: (B, C, H, W) teacher feature of the same shape.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"HCL needs equal shapes, got {tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}"
        )
    # Average pooling is linear, so pool(a) - pool(f) = pool(a - f): every level works on the one difference
    # map, which is also the only full-size tensor autograd keeps (not a, f and each level's pooled pair).
    diff = student_feature.float() - teacher_feature.float()
    loss = diff.square().mean()
    total_weight = 1.0
    weight = 1.0
    height = diff.shape[-2]
    for k in (4, 2, 1):
        if k >= height:
            continue
        # As in ReviewKD: the weight halves per level actually used, so small maps keep 0.5 for their first.
        weight /= 2
        loss = loss + weight * F.adaptive_avg_pool2d(diff, k).square().mean()
        total_weight += weight
    return loss / total_weight
