"""DIST (``dist``; Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their relations: the Pearson
correlation between the student's and the teacher's class distribution of each image (inter-class relation)
and between their scores of each class across the batch (intra-class relation).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..losses import dist_losses
from ..teacher import Teacher
from .base import DistillationBatch, DistillationMethod, DistillationOutput, student_region, teacher_region
from .registry import register_method

if TYPE_CHECKING:
    from ..configuration import PATTrainingArguments

__all__ = ["DISTDistillation"]


@register_method
class DISTDistillation(DistillationMethod):
    """DIST: ``w_ce·CE(z_s, y) + w_kd·(β·L_inter + γ·L_intra)``, both relation losses scaled by T².

    Settings (``PATTrainingArguments``): ``dist_beta`` (β, 1), ``dist_gamma`` (γ, 1), ``temperature`` (T, 1),
    ``ce_weight`` and ``kd_weight`` (1), ``label_smoothing`` (0): the reference code's ImageNet settings. Works
    without labels (then only the relation terms are used); labels may be class indices or soft targets.
    """

    name = "dist"
    default_temperature = 1.0
    description = "DIST: inter- and intra-class Pearson correlation between student and teacher predictions"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "dist_inter": "1 - Pearson correlation of each image's class distribution, times T² (before beta)",
        "dist_intra": "1 - Pearson correlation of each class's scores across the batch, times T² (before gamma)",
    }

    @classmethod
    def validate_args(cls, args: PATTrainingArguments) -> None:
        """``dist_beta``, ``dist_gamma``: finite and >= 0."""
        for name in ("dist_beta", "dist_gamma"):
            value = getattr(args, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite (0 switches the term off), got {value}.")

    def __init__(self, args: PATTrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__(args, student, teacher)
        self.beta = float(args.dist_beta)
        self.gamma = float(args.dist_gamma)

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
        with torch.no_grad():
            teacher_logits = self.region(teacher_region)(teacher, teacher_pixels)
        logits = self.region(student_region)(student, batch.pixel_values)
        loss, parts = self.region(_dist_loss)(self, logits, teacher_logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def compute_loss(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> DistillationOutput:
        """The DIST loss from the student's and the teacher's logits.

        Returns:
            The weighted loss, the student logits and the unweighted, detached parts ``ce`` (with labels),
            ``dist_inter`` and ``dist_intra`` (T² included, before β and γ).
        """
        inter, intra = dist_losses(logits, teacher_logits, self.temperature)
        loss = self.kd_weight * (self.beta * inter + self.gamma * intra)
        parts = {"dist_inter": inter.detach(), "dist_intra": intra.detach()}
        loss = self.add_cross_entropy(loss, parts, logits, labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "dist_beta": self.beta, "dist_gamma": self.gamma}


def _dist_loss(
    method: DISTDistillation, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dist``'s loss and its parts: a region."""
    out = method.compute_loss(logits, teacher_logits, labels)
    return out.loss, out.parts
