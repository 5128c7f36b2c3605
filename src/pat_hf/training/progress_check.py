"""Did the student train? Checks that a run which cannot change the student stops instead of exporting it as
distilled.

The settings that train nothing (a learning rate of 0, every loss weight 0, no step) are refused by
:class:`~pat_hf.PATTrainingArguments`; what only shows at run time is caught here, cheaply:

- at ``train()``'s start, a student without a trainable parameter is refused;
- gradients that are all zero (or absent) on the student at each of the first optimizer steps stop the run: the
  loss does not depend on the student;
- after training, the student's parameters are compared with a fingerprint taken at the start (or after the
  checkpoint a resume loads): a sum and a sum of squares per parameter, in float64. A student that did not change
  gets a loud warning, and its model card says that it is not trained (e.g. a run shorter than a warm-up whose
  first steps have a learning rate of 0, or a custom optimizer that leaves it alone).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import StudentUnchangedError

__all__ = ["StudentGradientCallback", "StudentUnchangedError", "parameter_fingerprint", "trainable_parameters"]


def trainable_parameters(student: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The student's parameters the optimizer updates (``requires_grad``)."""
    return [(name, p) for name, p in student.named_parameters() if p.requires_grad]


@torch.no_grad()
def parameter_fingerprint(student: nn.Module) -> torch.Tensor:
    """A (P, 2) float64 CPU tensor: the sum and the sum of squares of each trainable parameter. Any update of a
    real training step changes it; it costs one pass over the weights and one small device-to-host copy."""
    rows = [
        torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
        for _, p in trainable_parameters(student)
    ]
    if not rows:
        return torch.zeros(0, 2, dtype=torch.float64)
    if len({r.device for r in rows}) == 1:
        return torch.stack(rows).cpu()  # one device-to-host copy
    return torch.stack([r.cpu() for r in rows])


def _by_device(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return list(groups.values())


def why_unchanged(args: Any) -> str:
    """The usual causes, with this run's values."""
    return (
        f"learning_rate={args.learning_rate}, ce_weight={args.ce_weight}, kd_weight={args.kd_weight}, "
        f"distill_method={args.distill_method!r}; check the learning rate and its schedule, the loss weights, "
        "frozen student parameters (requires_grad=False) and a custom optimizer's parameter groups"
    )


class StudentGradientCallback(TrainerCallback):
    """Stops the run when the student's trainable parameters have no non-zero gradient at each of the first
    ``steps`` optimizer steps: the loss does not depend on the student (all its terms weighted 0, or the student
    detached), so no step can train it. Several steps, because a loss term may start at 0 and rise (DKD's
    warm-up); a zero gradient changes no weight meanwhile. DeepSpeed (gradients kept elsewhere) is not checked.

    Args:
        args: The run's arguments (named in the message).
        steps: Optimizer steps without gradient before the run stops.
    """

    def __init__(self, args: Any, steps: int = 3) -> None:
        self.args = args
        self.steps = steps
        self.zero_steps = 0
        self.done = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.zero_steps, self.done = 0, False

    @torch.no_grad()
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.done or model is None or getattr(args, "deepspeed", None):
            return
        student = getattr(getattr(model, "module", model), "student", None)
        if student is None:
            self.done = True
            return
        params = trainable_parameters(student)
        grads = [p.grad for _, p in params if p.grad is not None]
        # One device sync for all parameters (on one device; else one per device).
        if any(bool(torch.stack([g.ne(0).any() for g in group]).any()) for group in _by_device(grads)):
            self.done = True  # the loss reaches the student: checked once and for all
            return
        self.zero_steps += 1
        if self.zero_steps < self.steps:
            return
        what = "no gradient" if not grads else "a gradient of exactly 0 everywhere"
        raise StudentUnchangedError(
            f"At each of the first {self.steps} optimizer steps the student had {what} on its {len(params)} trainable "
            f"parameters: the loss does not depend on the student, so training cannot change it "
            f"({why_unchanged(self.args)}). Stopped at step {state.global_step + 1}, before its update."
        )
