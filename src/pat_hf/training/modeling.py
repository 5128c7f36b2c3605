"""The trainable wrapper (the one module the Trainer optimises, DDP-wraps and checkpoints) and
:func:`build_distillation_model`, the one function that builds it: the trainer, the benchmarks and scripts call it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.device import device_views
from ..data.views import ImageView, convert_view, make_view
from ..methods import DistillationBatch, DistillationMethod, get_method
from ..models.compile import is_compiled_module, unwrap_compiled
from ..models.rebuild import check_timm_rebuildable
from ..models.student import (
    create_student,
    is_timm_model,
    is_transformers_model,
    reconcile_student_view,
    student_num_classes,
)
from ..models.teacher import Teacher, load_teacher, match_classes

if TYPE_CHECKING:
    from .configuration import PATTrainingArguments

__all__ = ["DistillationModel", "build_distillation_model", "resolve_teacher"]

logger = logging.getLogger(__name__)


class DistillationModel(nn.Module):
    """Student + the method's trainable heads, with a non-registered reference to the frozen teacher.

    Everything that trains runs inside :meth:`forward`, so under DDP one all-reduce covers the student and the
    heads, and mixed-precision autocast covers the teacher's forward too. The teacher is deliberately not a
    submodule: it must not reach the optimizer, DDP's parameter/buffer sync, ``.train()`` or checkpoints.

    Args:
        student: The model being trained.
        method: The distillation method (holds its heads).
        teacher: The frozen teacher, or None.
        student_view: The student's input size and normalisation (to make its view from uint8 batches, and the
            teacher's when a batch has none).
        class_names: The dataset's class names in output order, when known.
        student_model_args: The ``timm.create_model`` arguments the student was built with (for its export).
        student_model_class: Dotted path of the timm class the export loads with, when timm's registry cannot
            rebuild it (a student built from its class); None when ``timm.create_model`` can.
        compiled_student: ``torch.compile(student)`` when the student was given compiled: the forward calls it
            (its own compile options), while ``student`` (registered, so state dicts, checkpoints and the export
            have the plain keys) is the module inside it. Not used once the trainer compiles regions.
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
        class_names: list[str] | None = None,
        student_model_args: dict[str, Any] | None = None,
        student_model_class: str | None = None,
        compiled_student: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.student = unwrap_compiled(student)
        if compiled_student is None and is_compiled_module(student):
            compiled_student = student
        # Not a submodule: its parameters are the student's, registered once under their plain names.
        object.__setattr__(self, "compiled_student", compiled_student)
        self.method = method
        object.__setattr__(self, "teacher", teacher)
        self.student_view = student_view
        self.class_names = class_names
        self.student_model_args = student_model_args
        self.student_model_class = student_model_class
        self._warned_view_conversion = False

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_pixel_values: torch.Tensor | None = None,
        erase: Any = None,
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """One step: the method's training loss in train mode, the student's evaluation loss otherwise.

        Args:
            pixel_values: Student inputs (B, 3, H, W): uint8 images (each model's view is made here, see
                :meth:`make_views`) or float inputs already normalised for the student.
            labels: Class indices (B,) or soft targets (B, K), or None.
            teacher_pixel_values: Teacher inputs made from the same images (uint8 or normalised float); derived
                from ``pixel_values`` on the device when absent.
            erase: Random-erasing boxes drawn for uint8 ``pixel_values``, a NumPy array or a tensor (see
                :func:`pat_hf.data.device.erase_batch`).

        Returns:
            ``{"loss", "logits", "loss_parts"}``; ``loss_parts`` maps component names to unweighted values.
        """
        views = self.make_views(
            {"pixel_values": pixel_values, "teacher_pixel_values": teacher_pixel_values, "erase": erase}
        )
        pixel_values, teacher_pixel_values = views["pixel_values"], views.get("teacher_pixel_values")
        teacher = self.teacher
        needs_teacher = self._needs_teacher()
        batch = DistillationBatch(pixel_values, labels, teacher_pixel_values if needs_teacher else None)
        student = self.student
        if self.compiled_student is not None and not self.method.compiling:
            student = self.compiled_student
        if self.training:
            out = self.method(student, teacher, batch)
        else:
            out = self.method.evaluate(student, teacher, batch)
        return {"loss": out.loss, "logits": out.logits, "loss_parts": out.parts}

    def _needs_teacher(self) -> bool:
        return self.teacher is not None and (self.training or self.method.eval_teacher_losses)

    def make_views(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Each model's input made on the batch's device, in one batched op per model.

        A uint8 batch (what :func:`pat_hf.with_image_transforms` yields: one image per sample, at the larger of the
        two views' sizes in training) becomes the student's view and, when the teacher is used, the teacher's:
        resized where the sizes differ (bilinear, antialiased when shrinking), scaled and normalised with each
        model's statistics. With drawn erasing boxes (``erase``) the image is first normalised for the student at
        its own size, erased there (timm's convention: noise in the student's normalisation), then converted to
        each view, so both models see the same box and fill. A uint8 ``teacher_pixel_values`` (the teacher's own
        evaluation crop) is normalised for the teacher. Float batches are taken as normalised for their model
        (datasets users built themselves); a missing teacher input is then converted from the student's.

        Args:
            inputs: The batch (``pixel_values``, optionally ``teacher_pixel_values``, ``erase``, ``labels``).

        Returns:
            The batch with float ``pixel_values`` (and ``teacher_pixel_values`` when the teacher is used), without
            ``erase``; other keys unchanged. Already-made views pass through untouched.
        """
        pixels = inputs["pixel_values"]
        teacher_pixels, erase = inputs.get("teacher_pixel_values"), inputs.get("erase")
        out = {k: v for k, v in inputs.items() if k != "erase"}
        teacher_view = self.teacher.view if self.teacher is not None else None
        needs_teacher = self._needs_teacher()
        if pixels.dtype == torch.uint8:
            derive = needs_teacher and teacher_pixels is None
            if derive:
                self._warn_if_resized_from_student(tuple(pixels.shape[-2:]), uint8=True)
            out["pixel_values"], derived = device_views(
                pixels, self.student_view, teacher_view if derive else None, erase
            )
            if derive:
                out["teacher_pixel_values"] = derived
        elif needs_teacher and teacher_pixels is None:
            # A float batch normalised for the student (a dataset built by hand, a tensor collator).
            self._warn_if_resized_from_student(tuple(pixels.shape[-2:]), uint8=False)
            out["teacher_pixel_values"] = convert_view(pixels, self.student_view, teacher_view)
        if teacher_pixels is not None and teacher_pixels.dtype == torch.uint8:
            out["teacher_pixel_values"] = make_view(teacher_pixels, teacher_view) if needs_teacher else None
        return out

    def _warn_if_resized_from_student(self, size: tuple[int, int], uint8: bool) -> None:
        # A uint8 image at the larger of the two sizes (what with_image_transforms makes for training) shows both
        # models the same field of view by construction; any other derivation may not (padding, other crops).
        teacher_size = self.teacher.view.size
        base = (max(self.student_view.size[0], teacher_size[0]), max(self.student_view.size[1], teacher_size[1]))
        if self.student_view.size == teacher_size or (uint8 and size == base) or self._warned_view_conversion:
            return
        self._warned_view_conversion = True
        logger.warning(
            "A batch without teacher_pixel_values: the teacher's %s input is resized from the student's %s "
            "one. That keeps the geometry only when both views show the same field of view (each a resize of "
            "one crop of the image); a student view made by padding or cropping differently (e.g. 28 px "
            "padded to 32) shows the teacher a shrunk or shifted image. Give the batches teacher_pixel_values "
            "(with_image_transforms(..., teacher_view)) to hand the teacher its own view.",
            "x".join(map(str, teacher_size)),
            "x".join(map(str, size)),
        )

    def compile_regions(self, options: dict[str, Any] | None) -> None:
        """``torch.compile`` the method's regions (student and teacher passes, heads, losses) with ``options``;
        None: back to eager. What ``torch_compile=True`` does (see :mod:`pat_hf.models.compile`)."""
        self.method.compile_regions(options)


def resolve_teacher(
    args: PATTrainingArguments,
    teacher: nn.Module | str | Teacher | None,
    *,
    view: ImageView | None = None,
    image_processor: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Teacher | None:
    """The run's :class:`Teacher`: loaded (a model or an id), checked against the teacher view the data was
    prepared with (``view``), or None for a method without teacher.

    Raises:
        ValueError: A method that needs a teacher got none; the data's teacher view disagrees with the teacher's
            image processor. :class:`pat_hf.errors.TeacherLoadError` when it cannot be loaded.
    """
    if not get_method(args.distill_method).requires_teacher:
        if teacher is not None:
            logger.warning("distill_method=%r uses no teacher; the teacher given is ignored.", args.distill_method)
        return None
    if teacher is None:
        raise ValueError(f"distill_method={args.distill_method!r} needs teacher=; use 'none' to train without one.")
    if isinstance(teacher, Teacher):
        if view is not None:
            teacher.use_data_view(view)
        return teacher
    return load_teacher(
        teacher,
        image_processor=image_processor,
        view=view,
        revision=revision,
        token=args.hub_token,
        trust_remote_code=trust_remote_code,
    )


def build_distillation_model(
    args: PATTrainingArguments,
    student: nn.Module | str,
    teacher: nn.Module | str | Teacher | None = None,
    *,
    class_names: list[str] | None = None,
    teacher_image_processor: Any = None,
    teacher_revision: str | None = None,
    trust_remote_code: bool = False,
    student_model_args: dict[str, Any] | None = None,
    processing_class: Any = None,
    data_views: dict[str, ImageView | None] | None = None,
) -> DistillationModel:
    """Builds everything a distillation run trains, checking that the pieces fit before any training starts.

    Loads and freezes the teacher, matches its classes to the dataset's (by name when both have names),
    creates the student when given by name (with as many classes as the dataset), checks that its export will
    rebuild the same architecture, and builds the method with its heads.

    Args:
        args: The training arguments (``distill_method`` and its settings).
        student: A timm model (or ``torch.compile`` of one), a timm name / ``hf-hub:`` / ``local-dir:`` id, or a
            transformers image classifier.
        teacher: A transformers image classifier, a Hub id / local path, or a loaded :class:`Teacher`; required
            unless the method is ``none``.
        class_names: The dataset's class names (the label space everything is matched to).
        teacher_image_processor: The teacher's image processor (input size, mean/std).
        teacher_revision: Hub revision of the teacher.
        trust_remote_code: Allow custom modelling code for a teacher given by id.
        student_model_args: ``timm.create_model`` arguments the student was built with, when timm did not
            record them.
        processing_class: The image processor of a transformers student.
        data_views: The views the data was prepared with (``student``, ``eval_student``, ``teacher``; see
            :func:`pat_hf.data.prepared_views`): the teacher's is checked or adopted, the student's recorded in
            its ``pretrained_cfg`` (see :func:`pat_hf.models.student.reconcile_student_view`).

    Returns:
        The :class:`DistillationModel` (student + method), with ``teacher``, ``class_names`` and
        ``student_model_args`` set.

    Raises:
        ValueError: A missing teacher, classes that cannot be matched, a student with another number of outputs,
            or a student whose export would not load back.
        TypeError: A student that is neither a timm nor a transformers model.

    Example:
        >>> model = build_distillation_model(PATTrainingArguments("out", distill_method="pat"), "resnet18",
        ...                                  "org/vit-cifar100", class_names=names)
    """
    method_cls = get_method(args.distill_method)
    class_names = list(class_names) if class_names else None
    views = data_views or {}
    loaded = resolve_teacher(
        args,
        teacher,
        view=views.get("teacher"),
        image_processor=teacher_image_processor,
        revision=teacher_revision,
        trust_remote_code=trust_remote_code,
    )
    if loaded is not None:
        loaded.class_index = match_classes(
            loaded.label_names, loaded.num_labels, class_names, len(class_names) if class_names else None
        )

    num_classes = len(class_names) if class_names else None
    if num_classes is None and loaded is not None:
        num_classes = loaded.num_labels if loaded.class_index is None else len(loaded.class_index)

    if isinstance(student, str):
        student = create_student(student, num_classes=num_classes)
    # torch.compile(student): checks, heads, export and checkpoints see the module inside it.
    compiled_student = student if is_compiled_module(student) else None
    student = unwrap_compiled(student) if isinstance(student, nn.Module) else student
    if not isinstance(student, nn.Module):
        raise TypeError(f"model must be an nn.Module or a timm model name, got {type(student).__name__}.")
    n_student = student_num_classes(student)
    if num_classes is not None and n_student is not None and n_student != num_classes:
        raise ValueError(
            f"The student has {n_student} outputs but the dataset has {num_classes} classes. Create it with "
            f"num_classes={num_classes} (timm.create_model(..., num_classes={num_classes}) or model.reset_classifier)."
        )
    if student_model_args is None:  # what create_student recorded (older timm records nothing itself)
        student_model_args = getattr(student, "pat_hf_model_args", None)
    model_class = None
    if is_timm_model(student):
        model_class = check_timm_rebuildable(student, student_model_args, getattr(student, "pat_hf_model_class", None))
    elif not is_transformers_model(student):
        raise TypeError(
            f"The student must be a timm model or a transformers image classifier, got {type(student).__name__}."
        )
    view = reconcile_student_view(student, processing_class, views.get("student"), views.get("eval_student"))
    method = method_cls(args, student, loaded)
    return DistillationModel(
        student,
        method,
        loaded,
        view,
        class_names=class_names,
        student_model_args=student_model_args,
        student_model_class=model_class,
        compiled_student=compiled_student,
    )
