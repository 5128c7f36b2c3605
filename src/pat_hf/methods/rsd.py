"""Redundancy suppression distillation (``rsd``; "Cross-Architecture Distillation Made Simple with Redundancy
Suppression", ICCV 2025, arXiv 2507.21844).

The student's penultimate embedding goes through an AAD module (expander ``Linear(D_s → E)``, ``BatchNorm1d``,
``GELU``, adaptor ``Linear(E → D_t)``), and the cross-correlation of the result with the teacher's penultimate
embedding over the batch is pushed to the identity (:func:`pat_hf.losses.rsd_loss`, Barlow Twins' loss). The AAD
module trains with the student, is saved in checkpoints and is never exported. No public implementation exists;
the choices the paper leaves open (λ, κ, E, the batch under DDP) are stated in docs/methods.md.

Under DDP the correlation is computed over the GLOBAL batch: the embeddings of every process are gathered with a
differentiable all-gather before the AAD module (so its BatchNorm sees the global batch too), and every process
computes the same loss; the gradients then equal one process's on the whole batch (the all-gather's backward sums
each process's share, DDP averages). A global batch of one sample has no per-dimension spread (and BatchNorm1d in
training mode refuses it): that step's RSD term is 0 and the student trains on its other terms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..losses import kl_div_loss, rsd_loss
from .base import DistillationMethod, Features, Shapes, init_head_weights
from .registry import register_method

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["AADModule", "RedundancySuppressionDistillation", "all_gather_rows"]

TARGETS = ("embedding", "logits")


class AADModule(nn.Sequential):
    """RSD's student-side module: ``Linear(D_s → E) → BatchNorm1d(E) → GELU → Linear(E → D_t)``.

    Args:
        student_dim: D_s.
        expander_dim: E.
        teacher_dim: D_t.
    """

    def __init__(self, student_dim: int, expander_dim: int, teacher_dim: int) -> None:
        super().__init__(
            nn.Linear(student_dim, expander_dim),
            nn.BatchNorm1d(expander_dim),
            nn.GELU(),
            nn.Linear(expander_dim, teacher_dim),
        )


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` from every process, concatenated in rank order; ``x`` itself outside DDP.

    Differentiable when ``x`` requires grad (``torch.distributed.nn.functional.all_gather``: the backward returns
    to each process the sum, over processes, of the gradients of its rows). Processes may hold different numbers
    of rows (an epoch's last batch): they are padded to the largest for the collective and cut back after.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return x
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0])) if x.shape[0] < max(sizes) else x.contiguous()
    if x.requires_grad:
        from torch.distributed.nn.functional import all_gather  # here: absent from builds without distributed

        chunks = list(all_gather(padded))
    else:
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)])


def _finite(args: Any, name: str, low: float = 0.0) -> None:
    value = getattr(args, name)
    if value is None or not low <= value < math.inf:
        raise ValueError(f"{name} must be >= {low:g} and finite, got {value}.")


@register_method
class RedundancySuppressionDistillation(DistillationMethod):
    """RSD: ``w_ce·CE(z_s, y) + w_kd·λ·L_RSD(AAD(e_s), e_t) [+ w_rsd_kd·KL(p_t ‖ p_s; T)·T²]``.

    Settings (``PATTrainingArguments``): ``rsd_weight`` (λ, 1), ``rsd_kappa`` (κ, default 1 / D_t),
    ``rsd_expander_dim`` (E, default 4·D_t), ``rsd_target`` (``embedding``: the penultimate embeddings, default;
    ``logits``: the logits, a logit distiller), ``rsd_kd_weight`` (an added Hinton KD term, 0: off as published),
    ``temperature`` (T of that term, 1), ``ce_weight`` and ``kd_weight`` (1), ``label_smoothing`` (0.1, OFA-KD's
    recipe, which the paper follows). Works without labels (no CE then); labels may be soft targets (Mixup).
    """

    name = "rsd"
    default_temperature = 1.0
    default_label_smoothing = 0.1
    description = "RSD: AAD-projected student embedding decorrelated against the teacher's (Barlow Twins loss)"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "rsd": "redundancy suppression: Σ(1 - C_ii)² + κ·Σ_{i≠j} C_ij², over D_t (before lambda)",
        "kd": "KL(p_t ‖ p_s) at temperature T, times T² (weighted by rsd_kd_weight, 0 by default)",
    }
    reads = ("logits", "embedding")

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """``rsd_weight``, ``rsd_kd_weight``: finite and >= 0; ``rsd_kappa``: None or finite and >= 0;
        ``rsd_expander_dim``: None or an integer >= 1; ``rsd_target``: ``embedding`` or ``logits``."""
        _finite(args, "rsd_weight")
        _finite(args, "rsd_kd_weight")
        if args.rsd_kappa is not None:
            _finite(args, "rsd_kappa")
        if args.rsd_expander_dim is not None and (
            int(args.rsd_expander_dim) != args.rsd_expander_dim or args.rsd_expander_dim < 1
        ):
            raise ValueError(
                f"rsd_expander_dim must be an integer >= 1 (or unset: 4 * D_t), got {args.rsd_expander_dim}."
            )
        if args.rsd_target not in TARGETS:
            raise ValueError(f"rsd_target must be one of {', '.join(TARGETS)}, got {args.rsd_target!r}.")

    def build(self, args: TrainingArguments, shapes: Shapes) -> None:
        self.target = str(args.rsd_target)
        side = "embedding" if self.target == "embedding" else "num_classes"
        student_dim, teacher_dim = getattr(shapes.student, side), getattr(shapes.teacher, side)
        self.weight = float(args.rsd_weight)
        self.kd_term_weight = float(args.rsd_kd_weight)
        # Barlow Twins' scaling: κ·D_t·(D_t - 1) off-diagonal terms weigh about as much as the D_t diagonal ones.
        self.kappa = float(args.rsd_kappa) if args.rsd_kappa is not None else 1.0 / teacher_dim
        self.expander_dim = int(args.rsd_expander_dim or 4 * teacher_dim)
        self.aad = AADModule(student_dim, self.expander_dim, teacher_dim)
        init_head_weights(self.aad)

    def gather(self, student: Features, teacher: Features | None) -> tuple[Features, Features | None]:
        # The global batch's statistics under DDP (see the module docstring); only what the RSD term reads.
        field = "embedding" if self.target == "embedding" else "logits"
        student = dataclasses.replace(student, **{field: all_gather_rows(getattr(student, field))})
        teacher = dataclasses.replace(teacher, **{field: all_gather_rows(getattr(teacher, field))})
        return student, teacher

    def losses(self, student: Features, teacher: Features, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        source = (
            (student.embedding, teacher.embedding) if self.target == "embedding" else (student.logits, teacher.logits)
        )
        z_s, z_t = source
        if z_s.shape[0] < 2:
            # One sample: nothing to standardise over. A zero touching every AAD parameter, so that DDP without
            # find_unused_parameters still sees each one used.
            rsd = sum(p.sum() for p in self.aad.parameters()) * 0.0
        else:
            rsd = rsd_loss(self.aad(z_s), z_t, self.kappa)
        return {"rsd": rsd, "kd": kl_div_loss(student.logits, teacher.logits, self.temperature)}

    def loss_weights(self) -> dict[str, float]:
        return {"rsd": self.kd_weight * self.weight, "kd": self.kd_term_weight}

    def extra_parameters(self) -> int:
        """Number of parameters of the AAD module (the only ones RSD adds; never exported)."""
        return sum(p.numel() for p in self.aad.parameters())

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "rsd_weight": self.weight,
            "rsd_kappa": self.kappa,
            "rsd_expander_dim": self.expander_dim,
            "rsd_target": self.target,
            "rsd_kd_weight": self.kd_term_weight,
        }

    def extra_repr(self) -> str:
        return f"target={self.target}, weight={self.weight}, kappa={self.kappa:g}, expander_dim={self.expander_dim}"
