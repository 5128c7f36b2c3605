"""Model EMA of the student with timm's ``ModelEmaV3`` (``ModelEmaV2`` on a timm without V3), as a TrainerCallback.

:class:`ModelEmaCallback` keeps an exponential moving average of the STUDENT (never the method's heads, prompts or
the teacher), updated after every optimizer step. :class:`~pat_hf.PATDistillationTrainer` adds one when
``model_ema=True``; one added by hand (``callbacks=[ModelEmaCallback(...)]``) works the same. The trainer then:

- evaluates the EMA beside the raw student whenever it evaluates (``eval_ema_accuracy``, ``eval_ema_loss``, ...);
- saves it in every checkpoint as ``checkpoint-N/ema.safetensors`` (the student's state dict, timm key names),
  records it in the manifest, restores it on resume and refuses a checkpoint without it;
- exports it (or the raw weights) as the final timm model according to ``export_weights``.

Under several processes every rank updates its own copy from the same (all-reduced) weights, so the parameters agree
bit for bit; BatchNorm running statistics are averaged from each rank's own buffers, so the EMA's buffers are set to
rank 0's before each evaluation and checkpoint, as the trainer does for the student.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["EMA_WEIGHTS_NAME", "EXPORT_WEIGHTS", "ModelEmaCallback", "find_model_ema"]

logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"
EXPORT_WEIGHTS = ("auto", "ema", "raw")


def _ema_class() -> type:
    from timm.utils import model_ema

    if hasattr(model_ema, "ModelEmaV3"):
        return model_ema.ModelEmaV3
    return model_ema.ModelEmaV2  # pragma: no cover - timm < 0.9


class ModelEmaCallback(TrainerCallback):
    """Exponential moving average of the student's weights (timm's ``ModelEmaV3``), updated after each optimizer step.

    Args:
        decay: EMA decay per optimizer step (0.9998 on the CIFAR recipes, 0.99996 for ViT/MLP students on ImageNet).
        warmup: Use timm's decay warm-up (``use_warmup``: the decay grows as ``1 - (1 + step)^-2/3`` up to
            ``decay``) and pass the step count. Off (the official PAT / OFA-KD code): a constant decay from the first
            step, starting from the initial weights.
        device: Where the EMA lives (``"cpu"`` saves accelerator memory); default the student's device. It is moved
            to the student's device for evaluation.

    The EMA module is created at the start of training (or when a checkpoint is loaded), as a copy of the student.
    """

    def __init__(self, decay: float = 0.9998, warmup: bool = False, device: str | torch.device | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"model_ema_decay must be in [0, 1), got {decay}.")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.device = device
        self.ema: nn.Module | None = None

    @classmethod
    def from_args(cls, args: Any) -> ModelEmaCallback:
        return cls(decay=args.model_ema_decay, warmup=args.model_ema_warmup, device=args.model_ema_device)

    def settings(self) -> dict[str, Any]:
        """What defines the EMA (manifests, model cards)."""
        return {"decay": self.decay, "warmup": self.warmup, "implementation": _ema_class().__name__}

    @property
    def module(self) -> nn.Module | None:
        """The averaged student (a copy of the student's architecture), or None before training."""
        return None if self.ema is None else self.ema.module

    def attach(self, student: nn.Module) -> nn.Module:
        """Creates the EMA as a copy of ``student`` (once); returns the averaged module."""
        if self.ema is None:
            cls = _ema_class()
            accepted = inspect.signature(cls.__init__).parameters
            kwargs: dict[str, Any] = {"decay": self.decay, "device": self.device}
            if self.warmup:
                if "use_warmup" not in accepted:  # pragma: no cover - ModelEmaV2 fallback
                    raise ValueError("model_ema_warmup needs timm's ModelEmaV3; upgrade timm.")
                kwargs["use_warmup"] = True
            self.ema = cls(student, **{k: v for k, v in kwargs.items() if k in accepted})
            self.ema.requires_grad_(False)
        return self.ema.module

    def update(self, student: nn.Module, step: int) -> None:
        """One EMA step from the student's current weights (``step``: optimizer steps so far)."""
        self.attach(student)
        if self.warmup:
            self.ema.update(student, step=step)
        else:
            self.ema.update(student)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        if model is not None:
            self.attach(_student_of(model))

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        # Called once per optimizer step (after the accumulated micro-batches), before any checkpoint of that step.
        if model is not None:
            self.update(_student_of(model), state.global_step)

    def broadcast_buffers(self) -> None:
        """Gives every process rank 0's EMA buffers (BatchNorm statistics); parameters already agree."""
        if self.ema is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        if torch.distributed.get_world_size() <= 1:
            return
        for buffer in self.ema.module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    @contextlib.contextmanager
    def swapped_into(self, wrapper: nn.Module) -> Iterator[nn.Module]:
        """Temporarily makes the EMA the wrapper's ``student`` (evaluation), on the student's device."""
        raw = wrapper.student
        ema = self.attach(raw)
        device = next(raw.parameters()).device
        home = next(ema.parameters()).device
        ema.to(device)
        wrapper.student = ema
        try:
            yield ema
        finally:
            wrapper.student = raw
            ema.to(home)


def _student_of(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "student", model)


def find_model_ema(trainer: Any) -> ModelEmaCallback | None:
    """The trainer's :class:`ModelEmaCallback`, or None when it has none."""
    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", []):
        if isinstance(callback, ModelEmaCallback):
            return callback
    return None
