"""Stops a run whose training loss went wrong, before that step's update: NaN / infinite (names the loss part)
or diverging while finite (far above its early level, or above an absolute bound).

Divergence rule (``divergence_factor`` F, ``divergence_max_loss`` M; 0 turns either off): the *early level* L0
is the mean total loss of the first :data:`EARLY_STEPS` training steps of the process (measured again after a
resume); from then on a step whose loss exceeds ``F × max(L0, 1)`` stops the run, and at any step a loss above
M does. The defaults (F = 1000, M = 1e6) leave room for any sane run: a healthy loss falls, and a loss 1000
times its start means the weights are being destroyed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import DivergedLossError, NonFiniteLossError

__all__ = ["EARLY_STEPS", "LossGuard"]

EARLY_STEPS = 20


class LossGuard:
    """One device sync per training step (the values of the loss parts), shared by both checks.

    Args:
        args: ``stop_on_nonfinite_loss``, ``divergence_factor``, ``divergence_max_loss``, ``distill_method``.
        accelerator: The trainer's Accelerator (under several processes the flags are summed so that every rank
            stops together: one rank raising alone would leave the others waiting in DDP's all-reduce).
    """

    def __init__(self, args: Any, accelerator: Any) -> None:
        self.args, self.accelerator = args, accelerator
        self.reset()

    def reset(self) -> None:
        self.early_sums: dict[str, float] = {}
        self.early_steps = 0

    @property
    def active(self) -> bool:
        args = self.args
        return bool(args.stop_on_nonfinite_loss or args.divergence_factor or args.divergence_max_loss)

    def check(self, parts: dict[str, torch.Tensor], loss: torch.Tensor, step: int) -> None:
        """Raises :class:`NonFiniteLossError` or :class:`DivergedLossError` for this step's loss."""
        if not self.active:
            return
        labels = [f"loss_{name}" for name in parts] + ["loss"]
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()] + [loss.detach().float()])
        numbers = values.tolist()
        nonfinite = [not math.isfinite(v) for v in numbers]
        local = [any(nonfinite) and self.args.stop_on_nonfinite_loss, False]
        if not local[0]:
            local[1] = self._diverged(numbers[-1]) is not None
        flags = local
        if self.accelerator.num_processes > 1:
            reduced = self.accelerator.reduce(torch.tensor(local, dtype=torch.float32, device=loss.device), "sum")
            flags = [bool(v) for v in reduced.tolist()]
        method = self.args.distill_method
        if flags[0]:
            if local[0]:
                where = ", ".join(f"{n}={v:.4g}" for n, v, b in zip(labels, numbers, nonfinite) if b)
            else:
                where = "on another process"
            raise NonFiniteLossError(
                f"Non-finite loss at step {step} (method {method!r}): {where}. Training stopped before this step's "
                "update; the checkpoints already written are intact. Try a lower learning_rate, max_grad_norm "
                "(gradient clipping), bf16 instead of fp16, or check the inputs (NaN pixels, wrong normalisation); "
                "resume_from_checkpoint restarts from the last good checkpoint."
            )
        if flags[1]:
            rule = self._diverged(numbers[-1]) if local[1] else "on another process"
            early = self._early()
            detail = ", ".join(
                f"{n}={v:.4g}" + (f" (early {early[n]:.4g})" if n in early else "") for n, v in zip(labels, numbers)
            )
            raise DivergedLossError(
                f"The training loss diverged at step {step} (method {method!r}): {rule}. {detail}. Training stopped "
                "before this step's update; the checkpoints already written are intact. Try a lower learning_rate, "
                "a warmup, max_grad_norm (gradient clipping), or check the inputs; set divergence_factor=0 and "
                "divergence_max_loss=0 (--divergence_factor 0 --divergence_max_loss 0) to turn this guard off."
            )
        if self.early_steps < EARLY_STEPS and not any(nonfinite):
            for name, value in zip(labels, numbers):
                self.early_sums[name] = self.early_sums.get(name, 0.0) + value
            self.early_steps += 1

    def _early(self) -> dict[str, float]:
        return {k: v / self.early_steps for k, v in self.early_sums.items()} if self.early_steps else {}

    def _diverged(self, loss: float) -> str | None:
        """Why ``loss`` counts as diverged, or None."""
        bound = self.args.divergence_max_loss
        if bound and loss > bound:
            return f"loss {loss:.4g} > divergence_max_loss {bound:g}"
        factor = self.args.divergence_factor
        if factor and self.early_steps >= EARLY_STEPS:
            level = self._early()["loss"]
            if loss > factor * max(level, 1.0):
                return (
                    f"loss {loss:.4g} is more than divergence_factor {factor:g} times its early level "
                    f"{level:.4g} (the mean of the first {EARLY_STEPS} steps, counted as at least 1)"
                )
        return None
