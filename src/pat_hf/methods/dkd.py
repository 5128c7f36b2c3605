"""Decoupled knowledge distillation (``dkd``; Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

The KD loss is split into a target-class term (TCKD: how sure the teacher is of the labelled class) and a
non-target-class term (NCKD: how it spreads the rest among the other classes), weighted independently by α
and β. The DKD term is switched on linearly over the first ``dkd_warmup_epochs`` epochs, as in the reference
code (megvii-research/mdistiller): weight ``min(epoch / warmup, 1)``, the epoch coming from the trainer state
(:meth:`~pat_hf.methods.DistillationMethod.set_progress`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..losses import dkd_losses
from .base import DistillationMethod, Features, Shapes
from .registry import register_method

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["DecoupledKnowledgeDistillation", "dkd_warmup_weight"]


def dkd_warmup_weight(epoch: float, warmup_epochs: float) -> float:
    """The DKD term's warm-up factor after ``epoch`` epochs: ``min(epoch / warmup_epochs, 1)``; 1 without
    warm-up (``warmup_epochs == 0``)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(max(float(epoch), 0.0) / warmup_epochs, 1.0)


@register_method
class DecoupledKnowledgeDistillation(DistillationMethod):
    """DKD: ``w_ce·CE(z_s, y) + w_kd·min(epoch / warmup, 1)·(α·TCKD + β·NCKD)``.

    Settings (``PATTrainingArguments``): ``dkd_alpha`` (α, 1), ``dkd_beta`` (β, 8), ``dkd_warmup_epochs`` (20),
    ``temperature`` (T, 4), ``ce_weight`` and ``kd_weight`` (1), ``label_smoothing`` (0). The defaults are the
    reference code's CIFAR-100 settings. Every training batch needs labels: class indices, or soft targets
    (mixup / cutmix), whose argmax class is the target of the decoupling (as in the OFA-KD benchmark code).
    """

    name = "dkd"
    default_temperature = 4.0
    description = "Decoupled KD: target-class and non-target-class terms weighted separately"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels",
        "tckd": "target-class KD term (binary KL at T, times T², before alpha and the warm-up)",
        "nckd": "non-target-class KD term (KL over the other classes at T, times T², before beta and the warm-up)",
    }

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """``dkd_alpha``, ``dkd_beta``, ``dkd_warmup_epochs``: finite and >= 0 (a warm-up of 0 is none)."""
        for name in ("dkd_alpha", "dkd_beta", "dkd_warmup_epochs"):
            value = getattr(args, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {value}.")

    reads = ("logits",)
    requires_labels = True  # the target-class term is defined by the labelled class ('kd' or 'dist' work without)

    def build(self, args: TrainingArguments, shapes: Shapes) -> None:
        self.alpha = float(args.dkd_alpha)
        self.beta = float(args.dkd_beta)
        self.warmup_epochs = float(args.dkd_warmup_epochs)
        self.epoch = 0.0
        # The factor lives in a tensor (a compiled forward reads it without recompiling when it changes); not
        # persistent: it is derived from the trainer state, never saved.
        self.register_buffer(
            "warmup_factor", torch.tensor(dkd_warmup_weight(0.0, self.warmup_epochs)), persistent=False
        )

    def set_progress(self, epoch: float) -> None:
        self.epoch = float(epoch)
        self.warmup_factor.fill_(dkd_warmup_weight(self.epoch, self.warmup_epochs))

    def losses(self, student: Features, teacher: Features, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_losses(student.logits, teacher.logits, labels, self.temperature)
        return {"tckd": tckd, "nckd": nckd}

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        weight = self.kd_weight * self.warmup_factor
        return {"tckd": weight * self.alpha, "nckd": weight * self.beta}

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "dkd_alpha": self.alpha,
            "dkd_beta": self.beta,
            "dkd_warmup_epochs": self.warmup_epochs,
        }

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, warmup_epochs={self.warmup_epochs}, epoch={self.epoch:g}"
