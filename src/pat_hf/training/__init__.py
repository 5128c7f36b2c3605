"""The training layer: the arguments, the trainable wrapper and the Trainer with its mixins.

- :mod:`.configuration`: :class:`PATTrainingArguments` (``TrainingArguments`` + distillation and recipe fields);
- :mod:`.modeling`: the distillation wrapper the Trainer prepares (student + method heads) and its builder;
- :mod:`.trainer`: :class:`PATDistillationTrainer`; its mixins :mod:`.checkpointing` (every private-Trainer
  override), :mod:`.hub_push`, :mod:`.recipe_mixin`; and what they use: :mod:`.validation` (labels, config
  values), :mod:`.output_dir` (folder guard, run lock), :mod:`.loss_guard`, :mod:`.ema`, :mod:`.schedules`,
  :mod:`.recipe`.

The top layer: may import every other one; nothing in the package but ``pat_hf.__init__`` and ``demo`` imports it.
"""

from .configuration import PATTrainingArguments
from .ema import ModelEmaCallback
from .modeling import build_distillation_model
from .trainer import PATDistillationTrainer

__all__ = ["ModelEmaCallback", "PATDistillationTrainer", "PATTrainingArguments", "build_distillation_model"]
