"""timm's learning-rate schedules (``create_scheduler_v2``) on transformers' Trainer, per epoch or per step.

timm's schedulers are stateless functions of the epoch (or update) number. Trainer steps its scheduler after every
optimizer step and checkpoints its ``state_dict``; :func:`build_timm_lr_scheduler` therefore wraps timm's schedule in
a ``torch.optim.lr_scheduler.LambdaLR`` whose factor for optimizer step ``k`` is timm's learning rate at epoch
``k // steps_per_epoch`` (``on_epochs=True``, timm's and the official PAT code's default: the rate changes at epoch
boundaries) or at update ``k`` (``on_epochs=False``), divided by the group's base rate. The timm scheduler itself
is built on a stand-in optimizer, so it never touches the real one.

Schedules (``lr_schedule``):

- ``"cosine"``: linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then cosine decay from the base rate to
  ``min_lr`` at the end of training (timm's ``CosineLRScheduler``; the warm-up overlays the first epochs of the
  cosine, as timm's default ``warmup_prefix=False``).
- ``"step"``: the same warm-up, then the base rate times ``decay_rate`` every ``decay_epochs`` epochs
  (timm's ``StepLRScheduler``: ImageNet CNN recipe ×0.1 every 30 epochs).
"""

from __future__ import annotations

import inspect
import math

import torch

__all__ = ["LR_SCHEDULES", "build_timm_lr_scheduler"]

LR_SCHEDULES = ("cosine", "step")


def build_timm_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    *,
    num_training_steps: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    warmup_lr: float = 1e-5,
    min_lr: float = 0.0,
    decay_epochs: float = 30.0,
    decay_rate: float = 0.1,
    on_epochs: bool = True,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following timm's ``schedule`` for Trainer.

    Args:
        optimizer: The optimizer (its groups' current ``lr`` are the base rates).
        schedule: "cosine" or "step".
        num_training_steps: Optimizer steps of the whole run.
        steps_per_epoch: Optimizer steps per epoch (Trainer's ``num_update_steps_per_epoch``).
        warmup_epochs: Epochs of linear warm-up from ``warmup_lr``.
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Final learning rate of the cosine.
        decay_epochs: Interval of the step decay.
        decay_rate: Factor of the step decay.
        on_epochs: Change the rate once per epoch (timm's default) or after every optimizer step.

    Returns:
        The scheduler; its learning rate during optimizer step ``k`` (0-based) is timm's at epoch
        ``k // steps_per_epoch`` (or update ``k``).
    """
    from timm.scheduler import create_scheduler_v2

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}.")
    steps_per_epoch = max(int(steps_per_epoch), 1)
    num_epochs = max(math.ceil(num_training_steps / steps_per_epoch), 1)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    # A stand-in optimizer with the same groups' rates: timm writes its rates there, never into the real groups.
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base_lrs])
    options = {
        "sched": schedule,
        "num_epochs": num_epochs,
        "decay_epochs": decay_epochs,
        "decay_rate": decay_rate,
        "min_lr": min_lr,
        "warmup_lr": warmup_lr,
        "warmup_epochs": warmup_epochs,
        # The warm-up overlays the schedule's first epochs (timm 0.6, the official code's): step decays fall on
        # epochs 30, 60, 90 and the cosine ends at the last epoch.
        "warmup_prefix": False,
        "step_on_epochs": on_epochs,
        "updates_per_epoch": steps_per_epoch,
    }
    accepted = inspect.signature(create_scheduler_v2).parameters
    if not on_epochs and "step_on_epochs" not in accepted:  # pragma: no cover - timm < 0.9
        raise ValueError("Per-step timm schedules need timm >= 0.9 (create_scheduler_v2 with step_on_epochs).")
    timm_scheduler, _ = create_scheduler_v2(stand_in, **{k: v for k, v in options.items() if k in accepted})

    def rates(step: int) -> list[float]:
        if on_epochs:
            timm_scheduler.step(step // steps_per_epoch)
        else:
            timm_scheduler.step_update(step)
        return [group["lr"] for group in stand_in.param_groups]

    def factor(index: int):
        base = base_lrs[index]
        return lambda step: rates(step)[index] / base if base else 0.0

    # Closures, not callable objects: LambdaLR then saves only its step count, which is all a resume needs.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(i) for i in range(len(base_lrs))])
