"""The method interface and its registry.

A distillation method is an ``nn.Module`` holding its trainable heads (none for KD; branch heads for OFA;
prompts, RAA and aligners for PAT). It lives inside the trainable wrapper next to the student, so the Trainer
optimises, DDP-wraps and checkpoints it with the student, and computes one training step's loss from the
student, the frozen teacher and the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ..losses import cross_entropy, kl_div_loss
from ..student import student_logits

if TYPE_CHECKING:
    from ..configuration import PATTrainingArguments
    from ..teacher import Teacher

__all__ = [
    "DistillationBatch",
    "DistillationMethod",
    "DistillationOutput",
    "available_methods",
    "get_method",
    "register_method",
]


@dataclass
class DistillationBatch:
    """One batch as the methods see it.

    Args:
        pixel_values: Student inputs (B, 3, H_s, W_s), normalised for the student.
        labels: Class indices (B,), or None for unlabelled data.
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
        parts: Unweighted loss components by name (``ce``, ``kd``, ...), for logging.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillationMethod(nn.Module):
    """Base class of the distillation methods.

    Subclasses set :attr:`name`, register with :func:`register_method`, build their heads in ``__init__`` and
    implement :meth:`forward` (one training step). Their trainable state (heads, buffers such as PAT's
    feedback) is ordinary module state, so it is saved in checkpoints and restored on resume.

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

    def __init__(self, args: PATTrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__()
        self.temperature = float(args.temperature if args.temperature is not None else self.default_temperature)
        self.label_smoothing = float(
            args.label_smoothing if args.label_smoothing is not None else self.default_label_smoothing
        )
        self.ce_weight = float(args.ce_weight)
        self.kd_weight = float(args.kd_weight)
        self.eval_teacher_losses = bool(args.eval_teacher_losses)

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """Computes one training step's loss. Runs in the wrapper's forward (under DDP and autocast)."""
        raise NotImplementedError

    def evaluate(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """Evaluation loss: the student's CE, plus the logit-level KD term against the plain teacher.

        No head, prompt or feedback takes part: evaluation measures the student alone.
        """
        logits = student_logits(student, batch.pixel_values)
        parts: dict[str, torch.Tensor] = {}
        loss = logits.new_zeros((), dtype=torch.float32)
        if batch.labels is not None:
            parts["ce"] = cross_entropy(logits, batch.labels, self.label_smoothing)
            loss = loss + self.ce_weight * parts["ce"]
        if teacher is not None and self.eval_teacher_losses and batch.teacher_pixel_values is not None:
            parts["kd"] = kl_div_loss(logits, teacher(batch.teacher_pixel_values), self.temperature)
            loss = loss + self.kd_weight * parts["kd"]
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

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


_METHODS: dict[str, type[DistillationMethod]] = {}

M = TypeVar("M", bound=type[DistillationMethod])


def register_method(cls: M) -> M:
    """Class decorator adding a method to the registry under ``cls.name``.

    Example:
        >>> @register_method
        ... class MyKD(DistillationMethod):
        ...     name = "my_kd"
        ...     def forward(self, student, teacher, batch): ...
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered.")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"A distillation method named {cls.name!r} is already registered ({existing.__name__}).")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered distillation methods."""
    return sorted(_METHODS)


def get_method(name: str) -> type[DistillationMethod]:
    """The method class registered under ``name``.

    Raises:
        ValueError: For an unknown name, listing the registered ones.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown distillation method {name!r}; registered methods: {', '.join(available_methods())}."
        ) from None
