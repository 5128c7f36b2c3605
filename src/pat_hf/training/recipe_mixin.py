""":class:`RecipeMixin`: the trainer side of the training recipe (mixed into
:class:`~pat_hf.PATDistillationTrainer` before ``Trainer``).

- Mixup / CutMix: :meth:`RecipeMixin.mix_batch` runs timm's ``Mixup`` (:class:`pat_hf.data.mixup.PairedMixup`) on the
  device, on the student's and the teacher's batch, right before the wrapper's forward in ``compute_loss``; only
  in training (evaluation never mixes). The methods receive the soft targets as ``batch.labels``.
- Model EMA: adds a :class:`pat_hf.training.ema.ModelEmaCallback` when ``model_ema`` is on, evaluates the EMA beside the
  raw student (``eval_ema_*`` metrics) and chooses the exported weights (``export_weights``). Checkpoints of the
  EMA are :class:`pat_hf.training.checkpointing.CheckpointMixin`'s.
- timm learning-rate schedules (``lr_schedule``): :meth:`RecipeMixin.create_scheduler` builds them with Trainer's
  number of optimizer steps per epoch (:mod:`pat_hf.training.schedules`).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from typing import Any

import torch

from ..data.mixup import PairedMixup, build_mixup
from .ema import ModelEmaCallback, find_model_ema
from .schedules import build_timm_lr_scheduler

__all__ = ["RecipeMixin"]


class RecipeMixin:
    """Mixup, model EMA and timm schedules for :class:`pat_hf.PATDistillationTrainer`."""

    mixup: PairedMixup | None = None
    _steps_per_epoch: int | None = None

    def _setup_recipe(self, num_classes: int | None, label_smoothing: float) -> None:
        """Builds the run's mixup and adds the EMA callback (call at the end of ``__init__``)."""
        self.mixup = build_mixup(self.args, num_classes, label_smoothing) if num_classes else None
        if self.mixup is None and (self.args.mixup_alpha or self.args.cutmix_alpha or self.args.cutmix_minmax):
            raise ValueError("Mixup / CutMix need the number of classes: give class_names or a student with a head.")
        if self.args.model_ema and find_model_ema(self) is None:
            self.add_callback(ModelEmaCallback.from_args(self.args))

    # ---- mixup -------------------------------------------------------------------------------------------------

    def mix_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The training batch mixed by timm's Mixup / CutMix: both views with the same λ, partner and box, the
        labels replaced by soft targets (B, K). Unchanged when mixup is off."""
        if self.mixup is None:
            return inputs
        pixels, teacher_pixels, targets = self.mixup(
            inputs["pixel_values"], inputs.get("teacher_pixel_values"), inputs.get("labels")
        )
        mixed = dict(inputs, pixel_values=pixels)
        if teacher_pixels is not None:
            mixed["teacher_pixel_values"] = teacher_pixels
        if targets is not None:
            mixed["labels"] = targets
        return mixed

    # ---- model EMA ---------------------------------------------------------------------------------------------

    @property
    def model_ema(self) -> ModelEmaCallback | None:
        """The EMA callback of this trainer (``model_ema=True`` or added by hand), or None."""
        return find_model_ema(self)

    def exported_weights(self) -> str:
        """``"ema"`` or ``"raw"``: what ``save_model()`` exports (``export_weights``; ``auto`` = EMA when on)."""
        choice = getattr(self.args, "export_weights", "auto")
        ema = self.model_ema
        if choice == "ema" and ema is None:
            raise ValueError("export_weights='ema' but the trainer has no model EMA (model_ema=True).")
        if choice == "auto":
            return "ema" if ema is not None else "raw"
        return choice

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """Trainer's loop, then (evaluation, not prediction) the same loop with the EMA as the student: its metrics
        join the raw ones as ``<prefix>_ema_*`` (``eval_ema_accuracy``, ``eval_ema_loss``, ``eval_ema_loss_ce``)."""
        loop = super().evaluation_loop
        output = loop(*args, **kwargs)
        ema = self.model_ema
        bound = inspect.signature(loop).bind(*args, **kwargs)
        bound.apply_defaults()
        if ema is None or bound.arguments.get("description") == "Prediction":
            return output
        prefix = bound.arguments.get("metric_key_prefix") or "eval"
        bound.arguments["metric_key_prefix"] = f"{prefix}_ema"
        ema.broadcast_buffers()
        # The raw pass's loss parts wait in the buffer for log(); the EMA pass gets its own.
        raw_parts, self._loss_parts["eval"] = self._loss_parts["eval"], defaultdict(list)
        try:
            with ema.swapped_into(self.accelerator.unwrap_model(self.model)):
                ema_output = loop(*bound.args, **bound.kwargs)
            self._merge_loss_parts(ema_output.metrics, "eval", f"{prefix}_ema_")
        finally:
            self._loss_parts["eval"] = raw_parts
        output.metrics.update(
            {k: v for k, v in ema_output.metrics.items() if not k.endswith(("_runtime", "_per_second"))}
        )
        return output

    # ---- timm learning-rate schedules --------------------------------------------------------------------------

    def set_initial_training_values(self, *args: Any, **kwargs: Any):
        # Trainer computes the optimizer steps per epoch here; a per-epoch timm schedule needs them.
        values = super().set_initial_training_values(*args, **kwargs)
        if isinstance(values, tuple) and len(values) > 1 and isinstance(values[1], int):
            self._steps_per_epoch = values[1]
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """timm's ``lr_schedule`` when set (see :mod:`pat_hf.training.schedules`), else Trainer's ``lr_scheduler_type``."""
        if getattr(self.args, "lr_schedule", None) is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        steps_per_epoch = self._steps_per_epoch
        if not steps_per_epoch:  # a Trainer without set_initial_training_values: from the epoch count
            steps_per_epoch = max(1, math.ceil(num_training_steps / max(float(self.args.num_train_epochs), 1.0)))
        args = self.args
        self.lr_scheduler = build_timm_lr_scheduler(
            optimizer if optimizer is not None else self.optimizer,
            args.lr_schedule,
            num_training_steps=num_training_steps,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr,
            min_lr=args.min_lr,
            decay_epochs=args.decay_epochs,
            decay_rate=args.decay_rate,
            on_epochs=args.lr_schedule_on_epochs,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler
