"""The trainable wrapper: the one module the Trainer optimises, DDP-wraps and checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from .methods import DistillationBatch, DistillationMethod
from .preprocessing import ImageView, convert_view
from .teacher import Teacher

__all__ = ["DistillationModel"]


class DistillationModel(nn.Module):
    """Student + the method's trainable heads, with a non-registered reference to the frozen teacher.

    Everything that trains runs inside :meth:`forward`, so under DDP one all-reduce covers the student and the
    heads, and mixed-precision autocast covers the teacher's forward too. The teacher is deliberately not a
    submodule: it must not reach the optimizer, DDP's parameter/buffer sync, ``.train()`` or checkpoints.

    Args:
        student: The model being trained.
        method: The distillation method (holds its heads).
        teacher: The frozen teacher, or None.
        student_view: The student's input size and normalisation (to derive teacher inputs when a batch has
            none).
    """

    # Trainer reads these: the loss is a per-batch mean, so Trainer must divide it by the accumulation steps.
    accepts_loss_kwargs = False
    _keys_to_ignore_on_save = None
    main_input_name = "pixel_values"

    def __init__(
        self,
        student: nn.Module,
        method: DistillationMethod,
        teacher: Teacher | None,
        student_view: ImageView,
    ) -> None:
        super().__init__()
        self.student = student
        self.method = method
        object.__setattr__(self, "teacher", teacher)
        self.student_view = student_view

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """One step: the method's training loss in train mode, the student's evaluation loss otherwise.

        Args:
            pixel_values: Student inputs (B, 3, H, W).
            labels: Class indices (B,) or None.
            teacher_pixel_values: Teacher inputs made from the same augmented images; derived from
                ``pixel_values`` on the device when absent.

        Returns:
            ``{"loss", "logits", "loss_parts"}``; ``loss_parts`` maps component names to unweighted values.
        """
        teacher = self.teacher
        needs_teacher = teacher is not None and (self.training or self.method.eval_teacher_losses)
        if needs_teacher and teacher_pixel_values is None:
            teacher_pixel_values = convert_view(pixel_values, self.student_view, teacher.view)
        batch = DistillationBatch(pixel_values, labels, teacher_pixel_values if needs_teacher else None)
        if self.training:
            out = self.method(self.student, teacher, batch)
        else:
            out = self.method.evaluate(self.student, teacher, batch)
        return {"loss": out.loss, "logits": out.logits, "loss_parts": out.parts}
