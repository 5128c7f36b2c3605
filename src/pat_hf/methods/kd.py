"""Plain supervised training (``none``) and Hinton knowledge distillation (``kd``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..losses import kl_div_loss
from ..teacher import Teacher
from .base import DistillationBatch, DistillationMethod, DistillationOutput, student_region, teacher_region
from .registry import register_method

__all__ = ["KnowledgeDistillation", "NoDistillation"]


@register_method
class NoDistillation(DistillationMethod):
    """Cross-entropy only: trains teachers and from-scratch baselines with the same tooling."""

    name = "none"
    requires_teacher = False
    description = "cross-entropy on the labels, no teacher"
    loss_parts: ClassVar[dict[str, str]] = {"ce": "cross-entropy on the labels"}

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        if batch.labels is None:
            raise ValueError("distill_method='none' needs labels in every batch.")
        logits = self.region(student_region)(student, batch.pixel_values)
        loss, parts = self.region(_ce_loss)(self, logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

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

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
        # The teacher's no-grad pass first: its transients are freed before the student's activations build up.
        with torch.no_grad():
            teacher_logits = self.region(teacher_region)(teacher, teacher_pixels)
        logits = self.region(student_region)(student, batch.pixel_values)
        loss, parts = self.region(_kd_loss)(self, logits, teacher_logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)


def _ce_loss(
    method: DistillationMethod, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``none``'s loss and its parts: a region."""
    parts: dict[str, torch.Tensor] = {}
    loss = method.add_cross_entropy(logits.new_zeros((), dtype=torch.float32), parts, logits, labels)
    return loss, parts


def _kd_loss(
    method: DistillationMethod, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kd``'s loss and its parts: a region."""
    kd = kl_div_loss(logits, teacher_logits, method.temperature)
    parts = {"kd": kd}
    return method.add_cross_entropy(method.kd_weight * kd, parts, logits, labels), parts
