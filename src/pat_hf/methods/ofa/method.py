"""OFA-KD (Hao et al., "One-for-All", NeurIPS 2023): branch heads on the student's stages learn the teacher's
logits (the heads are in :mod:`.heads`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ...losses import ofa_loss
from ...models.student import student_num_classes
from ...models.taps import StageSpec, build_taps
from ...models.teacher import Teacher
from ..base import (
    DistillationBatch,
    DistillationMethod,
    DistillationOutput,
    check_stage_list,
    resolve_stages,
    student_region,
    teacher_region,
)
from ..registry import register_method
from .heads import build_branch_head, teacher_feature_dim

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["OFADistillation"]


@register_method
class OFADistillation(DistillationMethod):
    """OFA-KD: ``w_ce·CE(z_s, y) + w_kd·OFA(z_s, z_t; ε_final) + w_ofa·Σ_s OFA(head_s(F_s), z_t; ε_s)``.

    One branch head per stage in ``args.ofa_stages``; see the module docstring for their structure. The student's
    stage features are read by forward hooks (:func:`pat_hf.models.taps.build_taps`) during the single student forward
    of a training step; evaluation uses the student alone.

    Args:
        args: Training arguments (``ofa_epsilon``, ``ofa_weight``, ``ofa_stages``, weights, temperature).
        student: The student; its stage layouts decide the heads.
        teacher: The frozen teacher (its final feature width sets the heads' width).
    """

    name = "ofa"
    default_temperature = 1.0
    # The OFA recipes train with label smoothing 0.1 (see docs), like PAT.
    default_label_smoothing = 0.1
    description = "OFA-KD: branch heads on the student's stages learn the teacher's logits"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "ofa": "OFA loss of the student's logits against the teacher's",
        "ofa_s{stage}": "OFA loss of the branch head on student stage {stage} (one per ofa_stages entry)",
    }

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """``ofa_stages``: distinct stages among 1-4; ``ofa_epsilon``: values >= 1, one per stage plus one for the
        final logits (or one for all); ``ofa_weight`` >= 0."""
        check_stage_list(args, "ofa_stages")
        try:
            args.ofa_epsilon = [float(e) for e in args.ofa_epsilon]
        except (TypeError, ValueError):
            raise ValueError(f"ofa_epsilon must be a list of numbers >= 1, got {args.ofa_epsilon!r}.") from None
        if not args.ofa_epsilon or any(not 1 <= e < float("inf") for e in args.ofa_epsilon):
            raise ValueError(f"ofa_epsilon values must be finite and >= 1, got {args.ofa_epsilon}.")
        if len(args.ofa_epsilon) not in (1, len(args.ofa_stages) + 1):
            raise ValueError(
                f"ofa_epsilon needs 1 value or {len(args.ofa_stages) + 1} (one per stage in ofa_stages plus one for "
                f"the final logits), got {len(args.ofa_epsilon)}."
            )
        if not 0 <= args.ofa_weight < float("inf"):
            raise ValueError(
                f"ofa_weight must be >= 0 and finite (0 switches the branch terms off), got {args.ofa_weight}."
            )

    def __init__(self, args: TrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__(args, student, teacher)
        self.stages = [int(s) for s in args.ofa_stages]
        # validate_args already checked the count: one value per stage plus the final logits, or one.
        eps = [float(e) for e in args.ofa_epsilon]
        if len(eps) == 1:
            eps = eps * (len(self.stages) + 1)
        self.epsilon = eps
        self.ofa_weight = float(args.ofa_weight)

        num_classes = student_num_classes(student)
        if num_classes is None:
            raise ValueError(f"Cannot tell the number of classes of the student {type(student).__name__}.")
        # The taps only hold forward hooks on the student: a plain attribute, so no parameter or state is duplicated.
        self._taps = build_taps(student)
        self.specs: list[StageSpec] = list(self._taps.output_specs)
        self.stages = resolve_stages(self.stages, len(self.specs), "ofa_stages", self._taps.model_name)
        if len(eps) == len(args.ofa_stages) + 1 and len(self.stages) != len(args.ofa_stages):
            # One value per default stage: keep the ones of the stages the student has, and the final one.
            eps = [eps[s - 1] for s in self.stages] + [eps[-1]]
        elif len(set(eps)) == 1:
            eps = [eps[0]] * (len(self.stages) + 1)
        self.epsilon = eps
        student_dim = self.specs[-1].channels
        teacher_dim = teacher_feature_dim(teacher.model) if teacher is not None else None
        self.head_width = max(student_dim, teacher_dim or student_dim)
        convolutional = self._taps.convolutional
        if not convolutional:
            # As in the official code: token heads work at the student's own width (max(d_s, d_t) would make a
            # DeiT-T student's heads 14x larger with a 768-wide teacher).
            self.head_width = student_dim
        self.heads = nn.ModuleDict(
            {
                f"s{stage}": build_branch_head(
                    self.specs[stage - 1],
                    # A student with fewer than 4 stages: its last stage gets the head of stage 4, and so on.
                    stage + 4 - len(self.specs),
                    self.head_width,
                    num_classes,
                    convolutional,
                )
                for stage in self.stages
            }
        )

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """One training step: a student forward (stage features captured), the teacher's logits, the OFA loss."""
        teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
        # The teacher's no-grad pass first: its transients are freed before the student's activations build up.
        with torch.no_grad():
            teacher_logits = self.region(teacher_region)(teacher, teacher_pixels)
        # The capture list is opened here, in eager code; the student's forward (a region) fills it.
        with self._taps.capture() as features:
            logits = self.region(student_region)(student, batch.pixel_values)
        if len(features) != len(self.specs):
            raise RuntimeError(
                f"Captured {len(features)} stage features from the student, expected {len(self.specs)}: was the "
                "student passed to the method the one it was built for?"
            )
        stage_features = {stage: features[stage - 1] for stage in self.stages}
        loss, parts = self.region(_ofa_loss)(self, logits, stage_features, teacher_logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def compute_loss(
        self,
        logits: torch.Tensor,
        stage_features: dict[int, torch.Tensor],
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> DistillationOutput:
        """The OFA loss from the student's logits and stage features (the heads run here).

        Args:
            logits: Student logits (B, K).
            stage_features: Stage number -> stage feature, for every stage in ``ofa_stages``.
            teacher_logits: Teacher logits (B, K), no gradient taken.
            labels: Class indices (B,), or None (no CE; the OFA targets are the teacher's alone).

        Returns:
            The weighted loss, the student logits and the unweighted, detached parts ``ce``, ``ofa`` (final logits)
            and ``ofa_s1`` ... ``ofa_s4``.
        """
        loss, parts = _ofa_loss(self, logits, stage_features, teacher_logits, labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def head_parameters(self) -> int:
        """Number of parameters of the branch heads (all trainable)."""
        return sum(p.numel() for p in self.heads.parameters())

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.update(ofa_epsilon=list(self.epsilon), ofa_weight=self.ofa_weight, ofa_stages=list(self.stages))
        return settings


def _ofa_loss(
    method: OFADistillation,
    logits: torch.Tensor,
    stage_features: dict[int, torch.Tensor],
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The branch heads and OFA's loss with its parts (:meth:`OFADistillation.compute_loss`): a region."""
    parts: dict[str, torch.Tensor] = {}
    final = ofa_loss(logits, teacher_logits, labels, method.epsilon[-1], method.temperature)
    loss = method.kd_weight * final
    parts["ofa"] = final
    loss = method.add_cross_entropy(loss, parts, logits, labels)
    branch_total = logits.new_zeros((), dtype=torch.float32)
    for stage, eps in zip(method.stages, method.epsilon):
        head_logits = method.heads[f"s{stage}"](stage_features[stage])
        branch = ofa_loss(head_logits, teacher_logits, labels, eps, method.temperature)
        branch_total = branch_total + branch
        parts[f"ofa_s{stage}"] = branch
    return loss + method.ofa_weight * branch_total, parts
