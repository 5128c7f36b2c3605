"""``PATTrainingArguments``: transformers' TrainingArguments plus the distillation settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .methods import available_methods

__all__ = ["PATTrainingArguments"]


@dataclass
class PATTrainingArguments(TrainingArguments):
    """Training arguments for :class:`~pat_hf.PATDistillationTrainer`.

    Every field of ``transformers.TrainingArguments`` is available; the fields below configure distillation.
    ``None`` for ``temperature`` and ``label_smoothing`` means the method's default (``kd``: T = 4, no
    smoothing; ``pat``: T = 1, smoothing 0.1). ``remove_unused_columns`` defaults to False because pat_hf
    datasets build ``pixel_values`` lazily with ``set_transform``.
    """

    distill_method: str = field(
        default="kd",
        metadata={"help": "Distillation method, one of the registered ones (none, kd, ...)."},
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": "Softmax temperature T (> 0) of the KL terms, scaled by T². Default: the method's."},
    )
    ce_weight: float = field(default=1.0, metadata={"help": "Weight (>= 0) of the cross-entropy on the labels."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight (>= 0) of the logit distillation term."})
    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": "Label smoothing in [0, 1) of the cross-entropy term. Default: the method's. "
            "(transformers' label_smoothing_factor is used when this is not set.)"
        },
    )
    eval_teacher_losses: bool = field(
        default=True,
        metadata={
            "help": "Also compute the logit distillation loss against the teacher during evaluation (logged "
            "as eval_loss_kd). Metrics always come from the student alone."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: image datasets create pixel_values on the fly with set_transform."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_names is None:
            self.label_names = ["labels"]
        if self.distill_method not in available_methods():
            raise ValueError(
                f"distill_method={self.distill_method!r} is not a registered distillation method; "
                f"choose one of: {', '.join(available_methods())}."
            )
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (it divides the logits), got {self.temperature}.")
        for name in ("ce_weight", "kd_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0 switches the term off), got {value}.")
        if self.label_smoothing is None and self.label_smoothing_factor:
            self.label_smoothing = self.label_smoothing_factor
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
