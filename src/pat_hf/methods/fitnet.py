"""FitNet hints (``fitnet``; Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015) across architectures.

A learned connector maps the student's stage feature to the shape of a teacher stage feature (the hint), and
the student learns to reproduce it under a mean squared error, next to the usual cross-entropy and KD terms.
Stage features are read with the stage taps (:func:`pat_hf.models.taps.build_taps`); every layout is handled as a map
(tokens: their patch grid, prefix tokens dropped), so one connector design covers CNN, ViT, Swin and MLP
students and teachers, as the heterogeneous FitNet of the OFA-KD benchmark does:

- same grid: a 1×1 convolution ``C_s → C_t``;
- student grid finer by an integer factor k: a k×k convolution of stride k (a patch embedding; for tokens, the
  merging of k×k neighbouring tokens followed by a linear layer);
- student grid coarser by an integer factor k: a 1×1 convolution ``C_s → k²·C_t`` whose channels are spread over
  k×k positions (depth-to-space; for tokens, a linear layer and "unpatchify");
- otherwise (grids that no integer factor relates, e.g. 5×5 and 4×4): a 1×1 convolution and an area / bilinear
  resize to the teacher's grid (both linear, so they commute; the convolution runs on the smaller grid).

The connectors are trained with the student, live in this method module (saved in
``checkpoint-N/distill_state.safetensors``) and are never exported.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.views import ImageView
from ..losses import hint_loss, kl_div_loss
from ..models.taps import StageSpec, as_map, build_taps
from ..models.teacher import Teacher
from .base import (
    DistillationBatch,
    DistillationMethod,
    DistillationOutput,
    init_head_weights,
    resolve_stages,
    student_region,
    teacher_region,
)
from .registry import register_method

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["FitNetDistillation", "HintConnector"]


class HintConnector(nn.Module):
    """Maps a student stage feature to the map shape (B, C_t, H_t, W_t) of a teacher stage feature.

    Args:
        student: Layout of the student's stage feature (map or tokens).
        teacher: Layout of the teacher's stage feature (map or tokens); the output is its map form.

    Attributes:
        mode: ``"same"``, ``"patch"`` (student finer), ``"unpatch"`` (student coarser) or ``"resize"``.
    """

    def __init__(self, student: StageSpec, teacher: StageSpec) -> None:
        super().__init__()
        self.student_spec = student
        self.teacher_spec = teacher
        hs, ws, ht, wt = student.height, student.width, teacher.height, teacher.width
        cs, ct = student.channels, teacher.channels
        self.factor = (1, 1)
        if (hs, ws) == (ht, wt):
            self.mode = "same"
            self.proj = nn.Conv2d(cs, ct, 1)
        elif hs % ht == 0 and ws % wt == 0:
            self.mode = "patch"
            kernel = (hs // ht, ws // wt)
            self.proj = nn.Conv2d(cs, ct, kernel, stride=kernel)
        elif ht % hs == 0 and wt % ws == 0:
            self.mode = "unpatch"
            self.factor = (ht // hs, wt // ws)
            self.proj = nn.Conv2d(cs, ct * self.factor[0] * self.factor[1], 1)
        else:
            self.mode = "resize"
            self.proj = nn.Conv2d(cs, ct, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Student stage feature in its spec's layout -> (B, C_t, H_t, W_t)."""
        x = as_map(feature, self.student_spec)
        target = (self.teacher_spec.height, self.teacher_spec.width)
        if self.mode == "unpatch":
            x = self.proj(x)
            batch, _, height, width = x.shape
            fh, fw = self.factor
            x = x.view(batch, -1, fh, fw, height, width).permute(0, 1, 4, 2, 5, 3)
            return x.reshape(batch, -1, height * fh, width * fw)
        if self.mode == "resize":
            # A 1×1 convolution and a resize (weights summing to 1 per output cell) commute exactly: convolve on
            # the smaller grid.
            if x.shape[-2] * x.shape[-1] <= target[0] * target[1]:
                return F.interpolate(self.proj(x), size=target, mode="bilinear", align_corners=False)
            return self.proj(F.interpolate(x, size=target, mode="area"))
        return self.proj(x)

    def extra_repr(self) -> str:
        s, t = self.student_spec, self.teacher_spec
        return f"mode={self.mode}, {s.channels}@{s.height}x{s.width} -> {t.channels}@{t.height}x{t.width}"


def _stage_numbers(value: Any, name: str) -> list[int]:
    try:
        stages = [int(s) for s in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of stage numbers among 1, 2, 3, 4; got {value!r}.") from None
    if any(s not in (1, 2, 3, 4) for s in stages):
        raise ValueError(f"{name} must hold stage numbers among 1, 2, 3, 4; got {stages}.")
    return stages


@register_method
class FitNetDistillation(DistillationMethod):
    """FitNet: ``w_ce·CE(z_s, y) + w_kd·KL(p_t ‖ p_s; T)·T² + w_hint·Σ_pairs MSE(connector(F_s[i]), F_t[j])``.

    Settings (``PATTrainingArguments``): ``fitnet_stages`` (student stages, all 4), ``fitnet_teacher_stages`` (the
    teacher stage each one learns from; empty: the same numbers), ``fitnet_weight`` (w_hint, 1), ``temperature``
    (T, 1), ``ce_weight`` and ``kd_weight`` (1), ``label_smoothing`` (0). The defaults are those of the OFA-KD
    benchmark's FitNet. Works without labels (then no CE); labels may be class indices or soft targets.

    Args:
        args: Training arguments.
        student: The student; its stage layouts decide the connectors.
        teacher: The frozen teacher; its stage layouts are the hints' shapes.
    """

    name = "fitnet"
    default_temperature = 1.0
    description = "FitNet: learned connectors map student stage features onto teacher stage features (MSE)"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "kd": "KL(p_t ‖ p_s) at temperature T, times T²",
        "hint": "MSE of the connected student stages against the teacher stages, summed over the pairs",
    }

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """``fitnet_stages``: distinct stages among 1-4, at least one; ``fitnet_teacher_stages``: empty, or one
        stage among 1-4 per student stage; ``fitnet_weight`` finite and >= 0. The pairs are sorted by student
        stage (in place)."""
        students = _stage_numbers(args.fitnet_stages, "fitnet_stages")
        if not students or len(set(students)) != len(students):
            raise ValueError(f"fitnet_stages must be one or more distinct stages among 1, 2, 3, 4; got {students}.")
        teachers = _stage_numbers(args.fitnet_teacher_stages or [], "fitnet_teacher_stages")
        if teachers and len(teachers) != len(students):
            raise ValueError(
                f"fitnet_teacher_stages needs one teacher stage per student stage of fitnet_stages ({students}), "
                f"got {teachers}; leave it empty to pair each student stage with the same teacher stage."
            )
        pairs = sorted(zip(students, teachers or students))
        args.fitnet_stages = [s for s, _ in pairs]
        args.fitnet_teacher_stages = [t for _, t in pairs] if teachers else []
        if not 0 <= args.fitnet_weight < math.inf:
            raise ValueError(
                f"fitnet_weight must be >= 0 and finite (0 switches the hints off), got {args.fitnet_weight}."
            )

    def __init__(self, args: TrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__(args, student, teacher)
        student_stages = [int(s) for s in args.fitnet_stages]
        teacher_stages = [int(t) for t in args.fitnet_teacher_stages] or list(student_stages)
        self.pairs: list[tuple[int, int]] = list(zip(student_stages, teacher_stages))
        self.hint_weight = float(args.fitnet_weight)
        # Hooks only (no parameters): plain attributes.
        student_size = ImageView.from_timm(student).size if hasattr(student, "pretrained_cfg") else None
        self.student_taps = build_taps(student, image_size=student_size)
        self.teacher_taps = build_taps(teacher.model, image_size=teacher.view.size)
        self.student_specs: list[StageSpec] = list(self.student_taps.output_specs)
        self.teacher_specs: list[StageSpec] = list(self.teacher_taps.output_specs)
        if [s for s, _ in self.pairs] == [1, 2, 3, 4] and not args.fitnet_teacher_stages:
            # The default pairs every stage with the same teacher stage: as many as both sides have.
            count = min(len(self.student_specs), len(self.teacher_specs))
            self.pairs = [(s, s) for s in range(1, count + 1)]
        for s, t in self.pairs:
            resolve_stages([s], len(self.student_specs), "fitnet_stages", self.student_taps.model_name)
            resolve_stages([t], len(self.teacher_specs), "fitnet_teacher_stages", self.teacher_taps.model_name)
        self.connectors = nn.ModuleDict(
            {
                self.pair_name(s, t): HintConnector(self.student_specs[s - 1], self.teacher_specs[t - 1])
                for s, t in self.pairs
            }
        )
        # Kaiming (fan-out) convolutions and zero biases, as the OFA-KD benchmark initialises its projectors.
        init_head_weights(self.connectors)

    @staticmethod
    def pair_name(student_stage: int, teacher_stage: int) -> str:
        """The connector's key: ``s<student stage>_t<teacher stage>``."""
        return f"s{student_stage}_t{teacher_stage}"

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
        with torch.no_grad(), self.teacher_taps.capture() as teacher_features:
            teacher_logits = self.region(teacher_region)(teacher, teacher_pixels)
        with self.student_taps.capture() as student_features:
            logits = self.region(student_region)(student, batch.pixel_values)
        for side, features in (("student", student_features), ("teacher", teacher_features)):
            expected = len(self.student_specs if side == "student" else self.teacher_specs)
            if len(features) != expected or any(f is None for f in features):
                raise RuntimeError(
                    f"Captured {len(features)} stage features from the {side}, expected {expected}: was the method "
                    "called "
                    f"with the {side} it was built for?"
                )
        hints = {s: student_features[s - 1] for s, _ in self.pairs}
        targets = {t: teacher_features[t - 1] for _, t in self.pairs}
        loss, parts = self.region(_fitnet_loss)(self, logits, teacher_logits, hints, targets, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def compute_loss(
        self,
        logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_features: dict[int, torch.Tensor],
        teacher_features: dict[int, torch.Tensor],
        labels: torch.Tensor | None,
    ) -> DistillationOutput:
        """The FitNet loss (the connectors run here).

        Args:
            logits: Student logits (B, K).
            teacher_logits: Teacher logits (B, K), no gradient taken.
            student_features: Student stage number -> its stage feature (canonical layout), for every pair.
            teacher_features: Teacher stage number -> its stage feature (canonical layout), for every pair.
            labels: Class indices (B,), soft targets (B, K), or None (no CE).

        Returns:
            The weighted loss, the student logits and the unweighted, detached parts ``ce``, ``kd`` and ``hint``
            (the MSE summed over the stage pairs).
        """
        hint = logits.new_zeros((), dtype=torch.float32)
        for s, t in self.pairs:
            mapped = self.connectors[self.pair_name(s, t)](student_features[s])
            target = as_map(teacher_features[t], self.teacher_specs[t - 1])
            if mapped.shape != target.shape:
                raise ValueError(
                    f"FitNet's connector for student stage {s} -> teacher stage {t} gives {tuple(mapped.shape)} but "
                    f"the teacher's feature is {tuple(target.shape)}: the connectors are built for the input sizes "
                    "seen when the method was created (the student's and the teacher's views)."
                )
            hint = hint + hint_loss(mapped, target)
        kd = kl_div_loss(logits, teacher_logits, self.temperature)
        loss = self.kd_weight * kd + self.hint_weight * hint
        parts = {"kd": kd.detach(), "hint": hint.detach()}
        loss = self.add_cross_entropy(loss, parts, logits, labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def connector_parameters(self) -> int:
        """Number of parameters of the connectors (all trainable)."""
        return sum(p.numel() for p in self.connectors.parameters())

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "fitnet_stages": [s for s, _ in self.pairs],
            "fitnet_teacher_stages": [t for _, t in self.pairs],
            "fitnet_weight": self.hint_weight,
        }


def _fitnet_loss(
    method: FitNetDistillation,
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_features: dict[int, torch.Tensor],
    teacher_features: dict[int, torch.Tensor],
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fitnet``'s loss and its parts (the connectors run here): a region."""
    out = method.compute_loss(logits, teacher_logits, student_features, teacher_features, labels)
    return out.loss, out.parts
