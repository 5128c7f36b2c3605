"""Pure loss functions used by the distillation methods.

Every function here is stateless and differentiable; the methods in :mod:`pat_hf.methods` combine them with
their weights. Keeping them pure lets the tests check each against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy",
    "dist_losses",
    "dkd_losses",
    "hard_targets",
    "hcl_loss",
    "hint_loss",
    "kl_div_loss",
    "ofa_loss",
    "pearson_correlation",
    "rsd_loss",
    "standardise_batch",
]


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


def hard_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices (B,) from class indices (B,) or soft targets (B, K) (mixup / cutmix / smoothed one-hot).

    Soft targets give their argmax class, as the OFA-KD benchmark code does for DKD's target mask
    (``label.max(1)[1]`` for 2-D labels). Ties go to the first class (``torch.argmax``).

    Raises:
        ValueError: On soft targets with another number of classes, or labels of another rank.
    """
    if labels.dim() == 1:
        return labels.long()
    if labels.dim() == 2 and labels.shape[1] == num_classes:
        return labels.argmax(dim=1)
    raise ValueError(f"labels must be class indices (B,) or soft targets (B, {num_classes}), got {tuple(labels.shape)}")


def dkd_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two terms (Zhao et al., CVPR 2022), unweighted: ``(TCKD, NCKD)``.

    With ``p = softmax(z / T)`` and ``t`` the target class:

    - TCKD: ``KL(b_t ‖ b_s)·T²`` between the binary distributions ``b = (p_t, 1 − p_t)`` (target against all
      the other classes together);
    - NCKD: ``KL(p̂_t ‖ p̂_s)·T²`` between the distributions over the K − 1 non-target classes, renormalised
      (``p̂ = softmax`` of the non-target logits over T).

    Both are batch means of the KL summed over its classes, in float32. ``b`` is computed in log space
    (``log(1 − p_t)`` is the log-sum-exp of the non-target logits minus that of all logits), so a confident
    prediction gives no ``log 0``; the non-target distribution leaves the target class out exactly instead of
    pushing its logit down by 1000 as the reference code does. No gradient is taken through the teacher.

    Args:
        student_logits: (B, K) student logits.
        teacher_logits: (B, K) teacher logits.
        labels: Class indices (B,) or soft targets (B, K); soft targets use their argmax class
            (:func:`hard_targets`).
        temperature: Softmax temperature T > 0 (the reference code's default is 4).

    Returns:
        Two scalar tensors, TCKD and NCKD.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"DKD needs at least 2 classes, got {num_classes}")
    target = hard_targets(labels, num_classes).to(student_logits.device)
    # Gathers and masks rather than boolean indexing: no data-dependent shapes, so torch.compile keeps one graph.
    mask = F.one_hot(target, num_classes).bool()
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.detach().float() / temperature

    def binary_and_other(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        others = z.masked_fill(mask, float("-inf"))
        log_target = F.log_softmax(z, dim=-1).gather(1, target[:, None]).squeeze(1)
        log_rest = torch.logsumexp(others, dim=-1) - torch.logsumexp(z, dim=-1)
        # The target's entry is -inf here; it is zeroed (value and gradient) before any product.
        return torch.stack([log_target, log_rest], dim=-1), F.log_softmax(others, dim=-1).masked_fill(mask, 0.0)

    log_b_s, log_other_s = binary_and_other(z_s)
    log_b_t, log_other_t = binary_and_other(z_t)
    scale = temperature**2
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True) * scale
    p_other_t = log_other_t.exp().masked_fill(mask, 0.0)
    nckd = (p_other_t * (log_other_t - log_other_s)).sum(dim=-1).mean() * scale
    return tckd, nckd


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of two (N, M) tensors: the cosine similarity of the rows once each is
    centred on its mean, with ``eps`` added to the product of the norms (as DIST's reference code). (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_losses(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's two relation losses (Huang et al., NeurIPS 2022), unweighted: ``(inter, intra)``.

    With ``Y_s = softmax(z_s / T)`` and ``Y_t = softmax(z_t / T)`` (B, K):

    - inter-class relation: ``(1 − mean_b ρ(Y_s[b, :], Y_t[b, :]))·T²``, the Pearson correlation of each sample's
      class distribution;
    - intra-class relation: ``(1 − mean_c ρ(Y_s[:, c], Y_t[:, c]))·T²``, the Pearson correlation of each class's
      scores across the batch.

    Computed in float32; no labels are used, so hard and soft targets make no difference. A batch of one image
    has no intra-class relation to match: the term is then the constant T² (zero gradient). No gradient is taken
    through the teacher.

    Args:
        student_logits: (B, K) student logits.
        teacher_logits: (B, K) teacher logits.
        temperature: Softmax temperature T > 0 (the reference code's default is 1).

    Returns:
        Two scalar tensors, the inter- and intra-class losses.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    y_s = F.softmax(student_logits.float() / temperature, dim=-1)
    y_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    scale = temperature**2
    inter = (1 - pearson_correlation(y_s, y_t).mean()) * scale
    intra = (1 - pearson_correlation(y_s.t(), y_t.t()).mean()) * scale
    return inter, intra


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNet's hint loss: the mean squared error between the connector's output and the teacher's feature.

    Mean over every element, in float32; the teacher feature is detached (the hint trains the student side
    only). The layout does not matter as long as both tensors share it (a mean over elements is the same for a
    map and its tokens).

    Args:
        student_feature: The student's stage feature mapped by the connector, e.g. (B, C_t, H_t, W_t).
        teacher_feature: The teacher's stage feature of the same shape.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"the hint loss needs equal shapes, got {tuple(student_feature.shape)} and {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(student_feature.float(), teacher_feature.detach().float())


def standardise_batch(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column of a (B, D) batch centred on its batch mean and divided by ``sqrt(var + eps)`` (biased
    variance over the batch, as BatchNorm without affine parameters; ``eps`` keeps a constant column at 0)."""
    mean = x.mean(dim=0, keepdim=True)
    var = (x - mean).square().mean(dim=0, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rsd_loss(student: torch.Tensor, teacher: torch.Tensor, kappa: float, eps: float = 1e-5) -> torch.Tensor:
    """Redundancy suppression (RSD, ICCV 2025; Barlow Twins' loss between two models' embeddings).

    Both (B, D) batches are standardised per dimension over the batch (:func:`standardise_batch`), their
    cross-correlation ``C = ŝᵀ t̂ / B`` (D × D) is pushed towards the identity:

    ``L = [Σ_i (1 − C_ii)² + κ · Σ_{i≠j} C_ij²] / D``

    the diagonal (invariance: each student dimension correlates with the same teacher dimension) plus κ times
    the off-diagonal (decorrelation: no dimension repeats another's information). Divided by D so that its
    scale does not grow with the width (at initialisation ``C ≈ 0`` and L ≈ 1). Computed in float32 at least
    (float64 inputs stay float64); no gradient is taken through the teacher.

    Args:
        student: (B, D) student embeddings after the AAD module, ``h(z_s)``.
        teacher: (B, D) teacher embeddings ``z_t``.
        kappa: Weight κ >= 0 of the off-diagonal terms (0: correlation only).
        eps: Added to the variance before the square root.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: On shapes that differ or a batch of fewer than 2 rows (no per-dimension spread to standardise).
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"RSD needs two (B, D) batches of one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    batch, dim = student.shape
    if batch < 2:
        raise ValueError("RSD standardises over the batch and needs at least 2 samples")
    dtype = torch.promote_types(student.dtype, torch.float32)  # bf16 / fp16 under autocast: float32
    s = standardise_batch(student.to(dtype), eps)
    t = standardise_batch(teacher.detach().to(dtype), eps)
    # Autocast would run the product in bf16 / fp16: sums of B products of standardised values need float32.
    with torch.autocast(student.device.type, enabled=False):
        c = s.t() @ t / batch
    diagonal = torch.diagonal(c)
    on_diagonal = (1 - diagonal).square().sum()
    off_diagonal = c.square().sum() - diagonal.square().sum()
    return (on_diagonal + kappa * off_diagonal) / dim
