"""DIST (``dist``; Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

Instead of matching the teacher's probabilities exactly (KL), the student matches their relations: the Pearson
correlation between the student's and the teacher's class distribution of each image (inter-class relation)
and between their scores of each class across the batch (intra-class relation).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..losses import dist_losses
from .base import DistillationMethod, Features, Shapes
from .registry import register_method

if TYPE_CHECKING:
    from transformers import TrainingArguments

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
    def validate_args(cls, args: TrainingArguments) -> None:
        """``dist_beta``, ``dist_gamma``: finite and >= 0."""
        for name in ("dist_beta", "dist_gamma"):
            value = getattr(args, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite (0 switches the term off), got {value}.")

    reads = ("logits",)

    def build(self, args: TrainingArguments, shapes: Shapes) -> None:
        self.beta = float(args.dist_beta)
        self.gamma = float(args.dist_gamma)

    def losses(self, student: Features, teacher: Features, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        inter, intra = dist_losses(student.logits, teacher.logits, self.temperature)
        return {"dist_inter": inter, "dist_intra": intra}

    def loss_weights(self) -> dict[str, float]:
        return {"dist_inter": self.kd_weight * self.beta, "dist_intra": self.kd_weight * self.gamma}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "dist_beta": self.beta, "dist_gamma": self.gamma}
