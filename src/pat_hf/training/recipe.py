"""``RecipeArguments``: the training-recipe fields of :class:`~pat_hf.PATTrainingArguments` that run in the trainer:
Mixup / CutMix (timm's ``Mixup``), model EMA (timm's ``ModelEmaV3``) and timm's learning-rate schedules.

The per-image augmentation (RandAugment, colour jitter, random erasing, crop, flip) belongs to the data: see
:func:`pat_hf.with_image_transforms` and the example script's data arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..data.mixup import MIXUP_MODES
from .ema import EXPORT_WEIGHTS
from .schedules import LR_SCHEDULES

__all__ = ["RecipeArguments", "recipe_summary"]

logger = logging.getLogger(__name__)


@dataclass
class RecipeArguments:
    """Mixup / CutMix, model EMA and timm learning-rate schedules (mixed into ``PATTrainingArguments``)."""

    # ---- Mixup / CutMix (timm's Mixup, applied on the device to the student's and the teacher's batch) ----
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Mixup's Beta(α, α) parameter; mixup is on when > 0 (0.8 in the ViT recipes)."}
    )
    cutmix_alpha: float = field(
        default=0.0, metadata={"help": "CutMix's Beta(α, α) parameter; CutMix is on when > 0 (1.0 in the ViT recipes)."}
    )
    cutmix_minmax: list[float] | None = field(
        default=None,
        metadata={"help": "CutMix box size as min and max fractions of the image side; turns CutMix on (alpha 1)."},
    )
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (or element / pair)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of CutMix instead of mixup when both are on."}
    )
    mixup_mode: str = field(
        default="batch", metadata={"help": "One λ per 'batch', per 'pair' of samples or per 'elem' (sample)."}
    )
    # ---- model EMA (timm's ModelEmaV3 of the student) ----
    model_ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the student (timm's ModelEmaV3), evaluated as eval_ema_*, "
            "saved in checkpoints (ema.safetensors) and exported according to export_weights."
        },
    )
    model_ema_decay: float = field(
        default=0.9998, metadata={"help": "EMA decay per optimizer step (0.99996 for ViT/MLP students on ImageNet)."}
    )
    model_ema_warmup: bool = field(
        default=False,
        metadata={"help": "timm's EMA decay warm-up (decay grows with the step count); off in the official code."},
    )
    model_ema_device: str | None = field(
        default=None, metadata={"help": "Device of the EMA ('cpu' saves accelerator memory); default the student's."}
    )
    export_weights: str = field(
        default="auto",
        metadata={
            "help": "Weights of the exported timm model: 'ema', 'raw', or 'auto' (the EMA when there is one). The "
            "model card says which."
        },
    )
    # ---- timm learning-rate schedules (instead of lr_scheduler_type) ----
    lr_schedule: str | None = field(
        default=None,
        metadata={
            "help": "timm schedule replacing lr_scheduler_type: 'cosine' (to min_lr) or 'step' (x decay_rate every "
            "decay_epochs), with a per-epoch linear warm-up from warmup_lr over warmup_epochs. None: transformers' "
            "lr_scheduler_type and warmup_steps."
        },
    )
    warmup_epochs: int = field(default=0, metadata={"help": "Warm-up epochs of lr_schedule (3 CNN, 20 ViT/MLP)."})
    warmup_lr: float = field(default=1e-5, metadata={"help": "Learning rate at the start of lr_schedule's warm-up."})
    min_lr: float = field(default=0.0, metadata={"help": "Final learning rate of the 'cosine' lr_schedule."})
    decay_epochs: float = field(default=30.0, metadata={"help": "Interval (epochs) of the 'step' lr_schedule."})
    decay_rate: float = field(default=0.1, metadata={"help": "Factor of the 'step' lr_schedule at each interval."})
    lr_schedule_on_epochs: bool = field(
        default=True,
        metadata={"help": "Change lr_schedule's rate once per epoch (timm's default) instead of every step."},
    )

    def check_recipe(self) -> None:
        """Raises ValueError on an out-of-range recipe setting (called by ``PATTrainingArguments``)."""
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be >= 0 (0 switches it off), got {getattr(self, name)}.")
        if self.cutmix_minmax is not None and (
            len(self.cutmix_minmax) != 2 or not 0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1
        ):
            raise ValueError(f"cutmix_minmax must be two fractions 0 < min < max <= 1, got {self.cutmix_minmax}.")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}.")
        if self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode must be one of {', '.join(MIXUP_MODES)}, got {self.mixup_mode!r}.")
        if not 0 <= self.model_ema_decay < 1:
            raise ValueError(f"model_ema_decay must be in [0, 1), got {self.model_ema_decay}.")
        if self.export_weights not in EXPORT_WEIGHTS:
            raise ValueError(f"export_weights must be one of {', '.join(EXPORT_WEIGHTS)}, got {self.export_weights!r}.")
        if self.export_weights == "ema" and not self.model_ema:
            raise ValueError("export_weights='ema' needs model_ema=True (or a ModelEmaCallback).")
        if self.lr_schedule is None:
            return
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} or None, got {self.lr_schedule!r}.")
        if getattr(self, "warmup_steps", 0) or getattr(self, "warmup_ratio", 0):
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r} warms up per epoch (warmup_epochs, warmup_lr); set warmup_steps "
                "(and warmup_ratio) to 0."
            )
        if self.warmup_epochs < 0 or self.warmup_lr < 0 or self.min_lr < 0:
            raise ValueError("warmup_epochs, warmup_lr and min_lr must be >= 0.")
        if self.decay_epochs <= 0 or not 0 < self.decay_rate <= 1:
            raise ValueError(
                f"decay_epochs must be > 0 and decay_rate in (0, 1], got {self.decay_epochs}, {self.decay_rate}."
            )
        scheduler_type = str(getattr(getattr(self, "lr_scheduler_type", None), "value", "linear"))
        if scheduler_type != "linear":
            logger.warning("lr_schedule=%r replaces lr_scheduler_type=%r.", self.lr_schedule, scheduler_type)


def recipe_summary(args: Any, ema_settings: dict[str, Any] | None, export: str | None) -> dict[str, Any]:
    """The recipe lines of the model card (only what is on)."""
    out: dict[str, Any] = {}
    if getattr(args, "lr_schedule", None):
        per = "epoch" if args.lr_schedule_on_epochs else "step"
        detail = (
            f"min_lr {args.min_lr}"
            if args.lr_schedule == "cosine"
            else f"x{args.decay_rate} every {args.decay_epochs} epochs"
        )
        out["lr_scheduler"] = (
            f"timm {args.lr_schedule} ({detail}), warm-up {args.warmup_epochs} epochs from {args.warmup_lr}, per {per}"
        )
    if getattr(args, "mixup_alpha", 0) or getattr(args, "cutmix_alpha", 0) or getattr(args, "cutmix_minmax", None):
        out["mixup / cutmix"] = (
            f"alpha {args.mixup_alpha} / {args.cutmix_alpha}, prob {args.mixup_prob}, switch {args.mixup_switch_prob}, "
            f"mode {args.mixup_mode}"
        )
    if ema_settings is not None:
        out["model EMA"] = f"decay {ema_settings['decay']} ({ema_settings['implementation']})"
    if export is not None:
        out["exported weights"] = (
            "the model EMA of the student" if export == "ema" else "the raw (non-averaged) student"
        )
    return out
