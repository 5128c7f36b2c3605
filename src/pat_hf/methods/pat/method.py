"""Perspective-Aware Teaching (PAT; Lin et al., ICCV 2025) as a pat_hf distillation method.

Per training step (docs/methods.md has the full description and the deviations from the official code):

1. student forward: logits ``z_s`` and 4 stage features ``F_s``;
2. plain teacher forward under no_grad: ``z_t0``;
3. prompted teacher forward (autograd on, teacher weights frozen): adaptive feedback prompts are added to the
   inputs of the chosen teacher stages through forward pre-hooks; logits ``z_t`` and stage outputs ``F_t``;
4. region-aware attention over ``F_s`` and per-stage aligners to the teacher's stage shapes: ``A_s``;
5. ``loss = w_ce·CE(z_s, y) + w_kd·KL(z_s ‖ z_t0; T) + w_fd·Σ_s HCL(A_s, F_t[s]) + w_reg·KL(z_t ‖ z_t0; T)``;
6. feedback for the next step: ``fb_s = (A_s − F_t[s]).detach()``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ...data.views import ImageView
from ...losses import hcl_loss, kl_div_loss
from ...models.recompute import BlockRecompute
from ...models.taps import StageSpec, as_map, build_taps
from ...models.teacher import Teacher
from ..base import (
    DistillationBatch,
    DistillationMethod,
    DistillationOutput,
    check_stage_list,
    init_head_weights,
    student_region,
    teacher_region,
)
from ..registry import register_method
from .heads import FeedbackAligner, RegionAwareAttention, StageAligner, region_grid
from .prompts import AdaptiveFeedbackPrompt

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = ["PerspectiveAwareTeaching"]


def _map_spec(spec: StageSpec) -> StageSpec:
    return StageSpec("map", spec.channels, spec.height, spec.width)


def _resolve_prompt_stages(stages: list[int], input_specs: list[StageSpec | None], model_name: str) -> list[int]:
    """The prompt stages for a teacher with ``len(input_specs)`` stages.

    The default (all 4) becomes every stage that has an input site; an explicit stage beyond the teacher's stage
    count, or one without an input site, is refused.
    """
    available = [i + 1 for i, spec in enumerate(input_specs) if spec is not None]
    if list(stages) == [1, 2, 3, 4]:
        return available
    missing = [s for s in stages if s not in available]
    if missing:
        raise ValueError(
            f"pat_prompt_stages {stages}: {model_name} has {len(input_specs)} stages for PAT, and prompts can go at "
            f"the input of stages {available}. Set pat_prompt_stages among those (or leave the default)."
        )
    return list(stages)


@register_method
class PerspectiveAwareTeaching(DistillationMethod):
    """PAT: prompts in the teacher (with student feedback), region-aware attention and aligners on the student.

    Settings (``PATTrainingArguments``): ``pat_prompt_stages``, ``pat_num_queries`` (64), ``pat_dim`` (512),
    ``pat_num_heads`` (8), ``pat_feature_weight`` (w_fd, 1), ``pat_reg_weight`` (w_reg, 1), ``pat_feedback``,
    ``pat_spatial_prompt``, plus ``ce_weight``, ``kd_weight`` (1), ``temperature`` (1) and ``label_smoothing``
    (0.1).
    """

    name = "pat"
    default_temperature = 1.0
    default_label_smoothing = 0.1
    description = "Perspective-Aware Teaching: feedback prompts in the teacher, region-aware attention, HCL"
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "kd": "KL(prompted teacher ‖ student) at temperature T, times T²",
        "hcl": "HCL feature loss between aligned student regions and prompted teacher stages",
        "reg": "KL regulariser between the prompted and the plain teacher",
    }

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """``pat_prompt_stages``: distinct stages among 1-4 (or none); ``pat_num_queries``: 4 x a square;
        ``pat_dim``: a positive multiple of ``pat_num_heads``; the loss weights finite and >= 0."""
        check_stage_list(args, "pat_prompt_stages")
        region_grid(args.pat_num_queries)
        if args.pat_dim <= 0 or args.pat_num_heads <= 0 or args.pat_dim % args.pat_num_heads:
            raise ValueError(
                f"pat_dim ({args.pat_dim}) must be a positive multiple of pat_num_heads ({args.pat_num_heads})."
            )
        for name in ("pat_feature_weight", "pat_reg_weight"):
            value = getattr(args, name)
            if not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be >= 0 and finite (0 switches the term off), got {value}.")

    def __init__(self, args: TrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__(args, student, teacher)
        self.feature_weight = float(args.pat_feature_weight)
        self.reg_weight = float(args.pat_reg_weight)
        self.use_feedback = bool(args.pat_feedback)
        self.prompt_stages = [int(s) for s in args.pat_prompt_stages]
        self.num_queries, self.dim, self.num_heads = (
            int(args.pat_num_queries),
            int(args.pat_dim),
            int(args.pat_num_heads),
        )
        self.spatial_prompt = bool(args.pat_spatial_prompt)
        self.checkpoint_teacher = bool(args.pat_checkpoint_teacher)

        # Hooks only: the taps are plain attributes, not submodules (they hold no parameters).
        student_size = ImageView.from_timm(student).size if hasattr(student, "pretrained_cfg") else None
        object.__setattr__(self, "student_taps", build_taps(student, image_size=student_size))
        object.__setattr__(self, "teacher_taps", build_taps(teacher.model, image_size=teacher.view.size))
        # Models with fewer than 4 stages: PAT runs with the stages both sides have, the deepest of each.
        self.num_stages = min(self.student_taps.num_stages, self.teacher_taps.num_stages)
        self._student_offset = self.student_taps.num_stages - self.num_stages
        self._teacher_offset = self.teacher_taps.num_stages - self.num_stages
        student_specs = self.student_taps.output_specs[self._student_offset :]
        teacher_in_specs = self.teacher_taps.input_specs[self._teacher_offset :]
        self.teacher_output_specs = list(self.teacher_taps.output_specs[self._teacher_offset :])
        self.prompt_stages = _resolve_prompt_stages(self.prompt_stages, teacher_in_specs, self.teacher_taps.model_name)
        if self.checkpoint_teacher and not self.teacher_taps.blocks:
            raise ValueError(
                f"pat_checkpoint_teacher recomputes the teacher's residual blocks, but the blocks of "
                f"{self.teacher_taps.model_name} are not known (its stages were found generically). "
                "Train without pat_checkpoint_teacher."
            )
        teacher_out = [_map_spec(s) for s in self.teacher_output_specs]
        teacher_in = [_map_spec(s) if s is not None else None for s in teacher_in_specs]

        self.prompts = nn.ModuleDict()
        self.feedback_aligners = nn.ModuleDict()
        for stage in self.prompt_stages:
            source, target = teacher_out[stage - 1], teacher_in[stage - 1]
            self.prompts[str(stage)] = AdaptiveFeedbackPrompt(
                target.channels, feedback=self.use_feedback, spatial=self.spatial_prompt
            )
            if self.use_feedback and source != target:
                self.feedback_aligners[str(stage)] = FeedbackAligner(source, target)
        self.raa = RegionAwareAttention(student_specs, self.num_queries, self.dim, self.num_heads)
        self.aligners = nn.ModuleList(
            StageAligner(spec, self.num_queries // 4, self.dim) for spec in self.teacher_output_specs
        )
        init_head_weights(self.raa)
        init_head_weights(self.aligners)
        # Per process, detached, from the previous micro-batch; plain attributes so DDP never broadcasts them.
        self.feedback: list[torch.Tensor | None] = [None] * self.num_stages
        # The prompt transforms are built once (a compiled pass guards on them: new ones would recompile it); they
        # read the feedback of the pass in progress from _pass_feedback, set around each prompted pass.
        self._pass_feedback: list[torch.Tensor | None] = [None] * self.num_stages
        self._prompt_transforms = {
            self._teacher_offset + stage - 1: functools.partial(self._apply_prompt, stage)
            for stage in self.prompt_stages
        }
        # Hooks on the frozen teacher's blocks, active only during the prompted pass: with them, the pass keeps only
        # the blocks' inputs and recomputes each block in the backward.
        self.teacher_recompute: BlockRecompute | None = None

    # ---- the prompted teacher pass -------------------------------------------------------------------------

    def _apply_prompt(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The input transform of teacher stage ``stage`` (1-4): ``x`` + its prompt, given the pass's feedback."""
        feedback = self._pass_feedback[stage - 1] if self.use_feedback else None
        # A batch of another size (an epoch's last batch) gets no feedback rather than a cropped one.
        if feedback is not None and feedback.shape[0] != x.shape[0]:
            feedback = None
        if feedback is not None:
            feedback = feedback.to(device=x.device, dtype=x.dtype)
            if str(stage) in self.feedback_aligners:
                feedback = self.feedback_aligners[str(stage)](feedback)
        return self.prompts[str(stage)](x, feedback)

    def prompted_teacher_forward(
        self, teacher: Teacher, pixel_values: torch.Tensor, feedback_maps: list[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher with prompts at its stage inputs: its logits and its 4 stage outputs (autograd kept).

        The prompts are switched on and the capture list opened here, in eager code; the pass itself is a compiled
        region when the method compiles (the prompt blocks trace into the teacher's graph). With
        ``pat_checkpoint_teacher`` it stays eager: block recomputation is hooks and an autograd Function.
        """
        # A batch of another size (an epoch's last, or the first after it) gets no feedback; decided here, so that a
        # compiled pass sees the same two cases, feedback or none, whatever came before.
        batch = pixel_values.shape[0]
        self._pass_feedback = [f if f is not None and f.shape[0] == batch else None for f in feedback_maps]
        self.teacher_taps.set_input_transforms(self._prompt_transforms)
        try:
            with self.teacher_taps.capture() as features:
                if self.checkpoint_teacher:
                    if self.teacher_recompute is None:
                        self.teacher_recompute = BlockRecompute(self.teacher_taps.blocks)
                    with self.teacher_recompute.active():
                        logits = teacher(pixel_values)
                else:
                    logits = self.region(_prompted_teacher_region)(teacher, pixel_values)
        finally:
            self.teacher_taps.set_input_transforms(None)
            self._pass_feedback = [None] * self.num_stages
        return logits, list(features)[self._teacher_offset :]

    # ---- one training step -------------------------------------------------------------------------------

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
        # The prompts see the previous step's feedback, not this step's student, so the order of the passes is
        # free; it is chosen for peak memory. Autograd runs the backward in reverse creation order:
        # - by default the prompted teacher pass comes last, so the backward walks it (and frees its saved
        #   activations, the largest set) before it allocates the heads' and the student's gradients;
        # - with the teacher's blocks recomputed it comes first, so the backward frees the student's activations
        #   before it recomputes the teacher's blocks.
        with torch.no_grad():
            plain_logits = self.region(teacher_region)(teacher, teacher_pixels)
        if self.checkpoint_teacher:
            prompted = self.prompted_teacher_forward(teacher, teacher_pixels, self.feedback)
        logits, aligned = self._student_side(student, batch.pixel_values)
        if not self.checkpoint_teacher:
            prompted = self.prompted_teacher_forward(teacher, teacher_pixels, self.feedback)
        prompted_logits, teacher_features = prompted
        loss, parts, feedback = self.region(_pat_loss)(
            self, logits, aligned, teacher_features, plain_logits, prompted_logits, batch.labels
        )
        self.feedback = feedback
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def _student_side(self, student: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's logits and its aligned features ``A_s`` (RAA, then the aligners)."""
        with self.student_taps.capture() as student_features:
            logits = self.region(student_region)(student, pixel_values)
        return logits, self.region(_align_student)(self, list(student_features)[self._student_offset :])

    def _targets(self, teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [as_map(f, spec) for f, spec in zip(teacher_features, self.teacher_output_specs)]

    # ---- diagnostics -------------------------------------------------------------------------------------

    @torch.no_grad()
    def prompt_effect(
        self, student: nn.Module, teacher: Teacher, batches: Iterable[DistillationBatch]
    ) -> dict[str, Any]:
        """What the prompts do to the teacher, replayed over ``batches`` as in training: each batch's prompts
        see the feedback of the batch before it (the first sees the method's current feedback, if its batch
        size matches). Student, heads and prompts run in eval mode; nothing is updated, and the method's feedback
        and modes are restored afterwards.

        Args:
            student: The student the feedback comes from.
            teacher: The frozen teacher.
            batches: Batches with ``teacher_pixel_values`` (and labels, for the top-1 figures).

        Returns:
            ``beta`` (stage -> the prompt's learned scale), ``feature_change`` (per teacher stage, the mean over
            batches of ``‖F_t − F_t0‖ / ‖F_t0‖``, prompted against plain stage output), ``plain_top1`` and
            ``prompted_top1`` (the teacher's top-1 without and with prompts; None without labels),
            ``logit_kl`` (mean ``KL(z_t ‖ z_t0)`` at T = 1) and ``images``.
        """
        modes = (student.training, self.training)
        feedback = self.feedback  # reassigned below, never changed in place
        student.eval()
        self.eval()
        changes: list[list[float]] = [[] for _ in range(self.num_stages)]
        kl: list[float] = []
        correct = {"plain": 0, "prompted": 0}
        images = labelled = 0
        try:
            for batch in batches:
                pixels = batch.teacher_pixel_values
                with self.teacher_taps.capture() as plain_features:
                    plain_logits = teacher(pixels)
                plain_features = list(plain_features)[self._teacher_offset :]
                prompted_logits, prompted_features = self.prompted_teacher_forward(teacher, pixels, self.feedback)
                for stage, (p, q) in enumerate(zip(prompted_features, plain_features)):
                    changes[stage].append(float((p - q).float().norm() / q.float().norm().clamp_min(1e-12)))
                kl.append(float(kl_div_loss(prompted_logits.float(), plain_logits.float(), 1.0)))
                images += pixels.shape[0]
                if batch.labels is not None:
                    labels = batch.labels.to(plain_logits.device)
                    correct["plain"] += int((plain_logits.argmax(-1) == labels).sum())
                    correct["prompted"] += int((prompted_logits.argmax(-1) == labels).sum())
                    labelled += labels.shape[0]
                # The next batch's prompts see this batch's feedback, as in a training step.
                _, aligned = self._student_side(student, batch.pixel_values)
                self.feedback = [(a - t).detach() for a, t in zip(aligned, self._targets(prompted_features))]
        finally:
            self.feedback = feedback
            student.train(modes[0])
            self.train(modes[1])
        return {
            "beta": {stage: float(self.prompts[str(stage)].beta) for stage in self.prompt_stages},
            "feature_change": [sum(c) / len(c) if c else None for c in changes],
            "plain_top1": correct["plain"] / labelled if labelled else None,
            "prompted_top1": correct["prompted"] / labelled if labelled else None,
            "logit_kl": sum(kl) / len(kl) if kl else None,
            "images": images,
        }

    # ---- state -------------------------------------------------------------------------------------------

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"feedback.{i}": fb for i, fb in enumerate(self.feedback) if fb is not None}

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.feedback = [tensors.get(f"feedback.{i}") for i in range(self.num_stages)]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "pat_prompt_stages": self.prompt_stages,
            "pat_num_queries": self.num_queries,
            "pat_dim": self.dim,
            "pat_num_heads": self.num_heads,
            "pat_feature_weight": self.feature_weight,
            "pat_reg_weight": self.reg_weight,
            "pat_feedback": self.use_feedback,
            "pat_spatial_prompt": self.spatial_prompt,
        }

    def extra_repr(self) -> str:
        return f"prompt_stages={self.prompt_stages}, feedback={self.use_feedback}, checkpoint_teacher={self.checkpoint_teacher}"


# ---- regions (compiled when the method compiles; see pat_hf.models.compile) ------------------------------------------


def _prompted_teacher_region(teacher: Teacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """The teacher's logits with the prompt transforms switched on (the taps' hooks call them): a region of its
    own, apart from the plain pass's :func:`teacher_region`, so each keeps its own graphs."""
    return teacher(pixel_values)


def _align_student(method: PerspectiveAwareTeaching, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """RAA over the student's stage features, then the aligners: ``A_s`` in the teacher's stage shapes."""
    return [aligner(r) for aligner, r in zip(method.aligners, method.raa(features))]


def _pat_loss(
    method: PerspectiveAwareTeaching,
    logits: torch.Tensor,
    aligned: list[torch.Tensor],
    teacher_features: list[torch.Tensor],
    plain_logits: torch.Tensor,
    prompted_logits: torch.Tensor,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """PAT's loss, its parts and the next step's feedback ``(A_s - F_t[s]).detach()``."""
    targets = method._targets(teacher_features)
    feature = sum(hcl_loss(a, t) for a, t in zip(aligned, targets))
    kd = kl_div_loss(logits, plain_logits, method.temperature)
    reg = kl_div_loss(prompted_logits, plain_logits, method.temperature)
    loss = method.kd_weight * kd + method.feature_weight * feature + method.reg_weight * reg
    parts = {"kd": kd, "hcl": feature, "reg": reg}
    loss = method.add_cross_entropy(loss, parts, logits, labels)
    return loss, parts, [(a - t).detach() for a, t in zip(aligned, targets)]
