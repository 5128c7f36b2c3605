"""Plain supervised training (``none``) and Hinton knowledge distillation (``kd``)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..losses import kl_div_loss
from ..student import student_logits
from ..teacher import Teacher
from .base import DistillationBatch, DistillationMethod, DistillationOutput
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
        logits = student_logits(student, batch.pixel_values)
        parts: dict[str, torch.Tensor] = {}
        loss = self.add_cross_entropy(logits.new_zeros((), dtype=torch.float32), parts, logits, batch.labels)
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
        with torch.no_grad():
            teacher_logits = teacher(teacher_pixels)
        logits = student_logits(student, batch.pixel_values)
        kd = kl_div_loss(logits, teacher_logits, self.temperature)
        parts = {"kd": kd.detach()}
        loss = self.add_cross_entropy(self.kd_weight * kd, parts, logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)
