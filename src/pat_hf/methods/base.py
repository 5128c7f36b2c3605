"""The method interface: what every distillation method is, receives and returns.

A distillation method is an ``nn.Module`` holding its trainable heads (none for KD; branch heads for OFA;
prompts, RAA and aligners for PAT). It lives inside the trainable wrapper next to the student, so the Trainer
optimises, DDP-wraps and checkpoints it with the student, and computes one training step's loss from the
student, the frozen teacher and the batch. It validates its own settings (:meth:`DistillationMethod.validate_args`),
so ``PATTrainingArguments`` needs to know no method's rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..data.views import ImageView
from ..losses import cross_entropy, kl_div_loss
from ..models.compile import compile_region
from ..models.student import student_logits, student_num_classes
from .features import READABLE, Features, ModelShapes, Shapes, _Reader
from .helpers import check_stage_list, init_head_weights, resolve_stages

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from ..models.teacher import Teacher

__all__ = [
    "READABLE",
    "DistillationBatch",
    "DistillationMethod",
    "DistillationOutput",
    "Features",
    "ModelShapes",
    "Shapes",
    "check_stage_list",
    "init_head_weights",
    "resolve_stages",
    "student_region",
    "teacher_region",
]


@dataclass
class DistillationBatch:
    """One batch as the methods see it.

    Args:
        pixel_values: Student inputs (B, 3, H_s, W_s), normalised for the student.
        labels: Class indices (B,), soft targets (B, K) (mixup / cutmix), or None for unlabelled data.
        teacher_pixel_values: Teacher inputs (B, 3, H_t, W_t), the same augmented images normalised for the
            teacher; None when the method has no teacher.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor | None = None
    teacher_pixel_values: torch.Tensor | None = None


@dataclass
class DistillationOutput:
    """What a method returns for one batch.

    Args:
        loss: The weighted total loss (scalar, differentiable).
        logits: The student's logits (B, K).
        parts: Unweighted loss components by name (``ce``, ``kd``, ...), for logging; detached here.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Detached here, in eager code, rather than inside a compiled region: inductor (torch 2.11-2.14) can merge a
        # loss equal to one of its parts (`0 + 1.0 * ce`) with that part, and when the part it returns is
        # detached, the loss loses its grad_fn too ("element 0 of tensors does not require grad").
        self.parts = {name: value.detach() for name, value in self.parts.items()}


def student_region(student: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The student's logits (its stage taps, when a method has some, fill their capture lists): a region."""
    return student_logits(student, pixel_values)


def teacher_region(teacher: Teacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """The teacher's logits in dataset class order, under the caller's grad mode: a region."""
    return teacher(pixel_values)


class DistillationMethod(nn.Module):
    """Base class of the distillation methods.

    Subclasses set :attr:`name`, register with :func:`pat_hf.methods.register_method` and check their settings in
    :meth:`validate_args`. Then either (the declarative way, most methods) set :attr:`reads`, build their heads in
    :meth:`build` and return their loss parts from :meth:`losses`, or build in ``__init__`` and implement
    :meth:`forward` (one training step) themselves (methods that rewrite the teacher's pass, as PAT). Their
    trainable state (heads, buffers) is ordinary module state, so it is saved in checkpoints and restored on
    resume.

    Args:
        args: The training arguments (method settings are read from them).
        student: The student model (to inspect its shapes; it is passed again to every call).
        teacher: The frozen teacher, or None for methods without one.
    """

    name: ClassVar[str] = ""
    requires_teacher: ClassVar[bool] = True
    default_temperature: ClassVar[float] = 1.0
    default_label_smoothing: ClassVar[float] = 0.0
    description: ClassVar[str] = ""
    #: The loss parts a training step returns (logged as ``loss_<name>``), with their meaning; ``{stage}`` in a
    #: name stands for each configured stage (``ofa_s{stage}``). docs/index.md's table is generated from these
    #: (:func:`pat_hf.methods.loss_parts_table`) and a test checks what each method really logs.
    loss_parts: ClassVar[dict[str, str]] = {"ce": "cross-entropy on the labels (labelled batches only)"}
    #: What the declarative step reads from both models (a subset of :data:`READABLE`; the logits always). Empty:
    #: the method implements :meth:`forward` itself.
    reads: ClassVar[tuple[str, ...]] = ()
    #: Whether every training batch must have labels (the declarative step refuses one without).
    requires_labels: ClassVar[bool] = False

    @classmethod
    def validate_args(cls, args: TrainingArguments) -> None:
        """Checks (and normalises in place) this method's own settings in ``args``; called by
        ``PATTrainingArguments.__post_init__`` for the chosen method, before any model is built.

        Raises:
            ValueError: A setting is out of range, saying which and what is allowed.
        """

    def __init__(self, args: TrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__()
        if self.requires_teacher and teacher is None:
            raise ValueError(f"distill_method={self.name!r} needs a teacher.")
        self.temperature = float(args.temperature if args.temperature is not None else self.default_temperature)
        self.label_smoothing = float(
            args.label_smoothing if args.label_smoothing is not None else self.default_label_smoothing
        )
        self.ce_weight = float(args.ce_weight)
        self.kd_weight = float(args.kd_weight)
        self.eval_teacher_losses = bool(args.eval_teacher_losses)
        self._compile_options: dict[str, Any] | None = None
        self._regions: dict[Callable, Callable] = {}
        if self.reads:
            unknown = set(self.reads) - set(READABLE)
            if unknown:
                raise ValueError(f"{type(self).__name__}.reads: unknown {sorted(unknown)}; choose among {READABLE}.")
            student_size = ImageView.from_timm(student).size if hasattr(student, "pretrained_cfg") else None
            self._student_reader = _Reader(student, self.reads, student_size)
            self._teacher_reader = _Reader(teacher.model, self.reads, teacher.view.size) if teacher else None
            teacher_classes = None
            if teacher is not None:
                mapped = teacher.class_index
                teacher_classes = len(mapped) if mapped is not None else teacher.num_labels
            self.build(
                args,
                Shapes(
                    student=self._student_reader.shapes(student_num_classes(student) or 0),
                    teacher=self._teacher_reader.shapes(teacher_classes) if teacher is not None else None,
                ),
            )

    # ---- the declarative step ---------------------------------------------------------------------------------

    def build(self, args: TrainingArguments, shapes: Shapes) -> None:
        """Reads this method's settings from ``args`` and builds its heads from ``shapes`` (declarative methods).

        Called once by ``__init__`` when :attr:`reads` is set, after the probes measured the shapes; a head
        assigned to ``self`` here trains with the student and is saved in checkpoints (never exported).
        """

    def losses(
        self, student: Features, teacher: Features | None, labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss parts of one training step by name (the cross-entropy is added by the base class).

        Runs inside a compiled region under ``torch_compile``: tensors in, tensors out, no hooks or Python state.

        Args:
            student: The student's features (what :attr:`reads` declares), attached to the autograd graph.
            teacher: The teacher's features (no gradient), or None for a method without teacher.
            labels: Class indices (B,), soft targets (B, K) (Mixup / CutMix) or None.
        """
        raise NotImplementedError(f"{type(self).__name__} sets `reads` but implements no `losses`.")

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        """The weight of each part :meth:`losses` returns; a part not listed weighs ``kd_weight``."""
        return {}

    def compute_loss(
        self, student: Features | torch.Tensor, teacher: Features | torch.Tensor | None, labels: torch.Tensor | None
    ) -> DistillationOutput:
        """The declarative step's loss from given features, without running any model (tests, custom loops).

        Args:
            student: The student's features, or its logits (B, K) alone.
            teacher: The teacher's features, its logits alone, or None.
            labels: Class indices (B,), soft targets (B, K) or None.

        Returns:
            The weighted loss, the student logits and the unweighted, detached parts.
        """
        student = student if isinstance(student, Features) else Features(student)
        teacher = teacher if isinstance(teacher, Features) or teacher is None else Features(teacher)
        loss, parts = _declared_loss(self, student.logits, student, teacher, labels)
        return DistillationOutput(loss=loss, logits=student.logits, parts=parts)

    def gather(self, student: Features, teacher: Features | None) -> tuple[Features, Features | None]:
        """The features :meth:`losses` receives, from this process's; eager code, run between the passes and the
        loss. Identity by default; a loss over batch statistics gathers the global batch here under DDP
        (``rsd``)."""
        return student, teacher

    # ---- compiled regions -------------------------------------------------------------------------------------

    def compile_regions(self, options: dict[str, Any] | None) -> None:
        """From now on :meth:`region` compiles with ``torch.compile(**options)`` (None: everything eager again).

        Called by the trainer for ``torch_compile`` (see :mod:`pat_hf.models.compile`). A method compiles the pieces its
        step calls through :meth:`region`; whatever it calls directly stays eager.
        """
        self._compile_options = dict(options) if options else None
        self._regions = {}

    @property
    def compiling(self) -> bool:
        """Whether :meth:`region` returns compiled functions."""
        return self._compile_options is not None

    def region(self, fn: Callable) -> Callable:
        """``fn`` itself, or once :meth:`compile_regions` was called, ``fn`` compiled (one compilation per function).

        A region is a module-level function of modules and tensors that traces into one graph: no hook switched
        on or off, no state kept, no capture list opened inside it (those happen around it, in eager code). Each
        region must be its own function: torch caches graphs and counts recompiles per code object.
        """
        if self._compile_options is None:
            return fn
        compiled = self._regions.get(fn)
        if compiled is None:
            compiled = self._regions[fn] = compile_region(fn, self._compile_options)
        return compiled

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """Computes one training step's loss. Runs in the wrapper's forward (under DDP and autocast).

        The declarative step: the teacher's pass under no_grad, then the student's, each reading what
        :attr:`reads` declares through the taps; :meth:`gather`; then one region with :meth:`losses`, the
        cross-entropy and the weights: ``w_ce·CE(z_s, y) + Σ_part weight(part)·part``.
        """
        if not self.reads:
            raise NotImplementedError(f"{type(self).__name__} sets no `reads`: it must implement forward().")
        if self.requires_labels and batch.labels is None:
            raise ValueError(f"distill_method={self.name!r} needs labels in every training batch.")
        teacher_features = None
        if self.requires_teacher:
            teacher, teacher_pixels = self.teacher_inputs(teacher, batch)
            # The teacher's no-grad pass first: its transients are freed before the student's activations build up.
            with torch.no_grad(), self._teacher_reader.capture() as found:
                teacher_logits = self.region(teacher_region)(teacher, teacher_pixels)
            teacher_features = Features(teacher_logits, **found)
        with self._student_reader.capture() as found:
            logits = self.region(student_region)(student, batch.pixel_values)
        student_features, teacher_features = self.gather(Features(logits, **found), teacher_features)
        loss, parts = self.region(_declared_loss)(self, logits, student_features, teacher_features, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def set_progress(self, epoch: float) -> None:
        """Receives the training progress before each training forward; does nothing by default.

        The trainer calls it from ``compute_loss`` with ``TrainerState.epoch`` (epochs completed, fractional:
        ``1.5`` is halfway through the second epoch; it advances once per optimizer step). A method whose loss
        follows a schedule (DKD's warm-up) derives it from this value instead of counting steps itself, so
        resuming from a checkpoint restores the schedule exactly (the trainer state is saved with the
        checkpoint). Code calling the method directly, outside the trainer, calls it itself.

        Args:
            epoch: Epochs of training completed so far (>= 0).
        """

    @classmethod
    def eval_loss_parts(cls) -> dict[str, str]:
        """The parts :meth:`evaluate` returns (logged as ``eval_loss_<name>``)."""
        parts = {"ce": "cross-entropy of the student"}
        if cls.requires_teacher:
            parts["kd"] = "KL to the plain teacher at T, times T² (with eval_teacher_losses)"
        return parts

    def evaluate(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """Evaluation loss: the student's CE, plus the logit-level KD term against the plain teacher.

        No head, prompt or feedback takes part: evaluation measures the student alone.
        """
        logits = self.region(student_region)(student, batch.pixel_values)
        teacher_logits = None
        if teacher is not None and self.eval_teacher_losses and batch.teacher_pixel_values is not None:
            teacher_logits = self.region(teacher_region)(teacher, batch.teacher_pixel_values)
        loss, parts = self.region(_evaluation_loss)(self, logits, teacher_logits, batch.labels)
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    # ---- helpers for subclasses -----------------------------------------------------------------------------

    def add_cross_entropy(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """``loss + w_ce·CE(logits, labels)``, recording the unweighted CE as ``parts["ce"]`` (not detached:
        :class:`DistillationOutput` detaches the parts); ``loss`` unchanged without labels.

        ``labels`` are class indices (B,), smoothed by ``label_smoothing``, or soft targets (B, K) from Mixup /
        CutMix, used as given: timm's ``Mixup`` has already applied the same label smoothing to them."""
        if labels is None:
            return loss
        ce = cross_entropy(logits, labels, self.label_smoothing)
        parts["ce"] = ce
        return loss + self.ce_weight * ce

    def teacher_inputs(self, teacher: Teacher | None, batch: DistillationBatch) -> tuple[Teacher, torch.Tensor]:
        """The teacher and its inputs for a training step.

        Raises:
            ValueError: When either is missing (the method was called without a teacher or teacher inputs).
        """
        if teacher is None or batch.teacher_pixel_values is None:
            raise ValueError(
                f"distill_method={self.name!r} needs a teacher and teacher inputs in every training batch."
            )
        return teacher, batch.teacher_pixel_values

    # ---- state ------------------------------------------------------------------------------------------------

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        """State that is not a parameter or buffer but must survive a resume (PAT's feedback).

        Kept out of ``state_dict`` on purpose: DDP broadcasts buffers from rank 0, and this state is per process.
        """
        return {}

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what :meth:`extra_state_tensors` returned."""

    def settings(self) -> dict[str, Any]:
        """The settings that define this method's run (manifests, model cards); JSON-serialisable."""
        return {
            "method": self.name,
            "temperature": self.temperature,
            "label_smoothing": self.label_smoothing,
            "ce_weight": self.ce_weight,
            "kd_weight": self.kd_weight,
        }


def _declared_loss(
    method: DistillationMethod,
    logits: torch.Tensor,
    student: Features,
    teacher: Features | None,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The declarative step's loss and its parts: a region. ``logits`` are this process's (the CE's)."""
    parts = dict(method.losses(student, teacher, labels))
    weights = method.loss_weights()
    loss = logits.new_zeros((), dtype=torch.float32)
    for name, value in parts.items():
        loss = loss + weights.get(name, method.kd_weight) * value
    return method.add_cross_entropy(loss, parts, logits, labels), parts


def _evaluation_loss(
    method: DistillationMethod, logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The evaluation loss of :meth:`DistillationMethod.evaluate` and its parts: a region."""
    parts: dict[str, torch.Tensor] = {}
    loss = method.add_cross_entropy(logits.new_zeros((), dtype=torch.float32), parts, logits, labels)
    if teacher_logits is not None:
        parts["kd"] = kl_div_loss(logits, teacher_logits, method.temperature)
        loss = loss + method.kd_weight * parts["kd"]
    return loss, parts
