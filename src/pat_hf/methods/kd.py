"""Plain supervised training (``none``) and Hinton knowledge distillation (``kd``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..losses import kl_div_loss
from ..models.teacher import Teacher
from .base import DistillationBatch, DistillationMethod, DistillationOutput, Features
from .registry import register_method

__all__ = ["KnowledgeDistillation", "NoDistillation"]


@register_method
class NoDistillation(DistillationMethod):
    """Cross-entropy only: trains teachers and from-scratch baselines with the same tooling."""

    name = "none"
    requires_teacher = False
    description = "cross-entropy on the labels, no teacher"
    loss_parts: ClassVar[dict[str, str]] = {"ce": "cross-entropy on the labels"}
    reads = ("logits",)
    requires_labels = True

    def losses(self, student: Features, teacher: Features | None, labels: torch.Tensor | None) -> dict:
        return {}

    def evaluate(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        return super().evaluate(student, None, batch)

    def settings(self) -> dict:
        return {"method": self.name, "label_smoothing": self.label_smoothing}


@register_method
class KnowledgeDistillation(DistillationMethod):
    """Hinton et al. (2015): ``w_ce·CE(z_s, y) + w_kd·KL(p_t || p_s; T)·T²``.

    Works without labels too (then only the KD term is used).
    """

    name = "kd"
    default_temperature = 4.0
    description = "Hinton knowledge distillation on the logits"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "kd": "KL(p_t ‖ p_s) at temperature T, times T²",
    }

    reads = ("logits",)

    def losses(self, student: Features, teacher: Features, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"kd": kl_div_loss(student.logits, teacher.logits, self.temperature)}
