"""Helpers shared by the methods' heads: the OFA-KD / PAT initialisation and stage lists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    pass


def init_head_weights(module: nn.Module) -> None:
    """The initialisation OFA-KD and PAT give the modules they add to the student side.

    Kaiming normal (fan-out, ReLU) for convolutions, truncated normal (std 0.02) for linear layers, zero biases,
    and weight 1 / bias 0 for the norms. PAT's prompt blocks keep PyTorch's defaults and do not go through here.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_stage_list(args: Any, name: str) -> None:
    """Checks (and sorts in place) a list of stage numbers among 1-4 held by ``args.<name>``.

    Raises:
        ValueError: On a number outside 1-4 or a repeated one.
    """
    try:
        stages = [int(s) for s in getattr(args, name)]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a list of stage numbers among 1, 2, 3, 4; got {getattr(args, name)!r}."
        ) from None
    if any(s not in (1, 2, 3, 4) for s in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"{name} must be distinct stage numbers among 1, 2, 3, 4; got {stages}.")
    setattr(args, name, sorted(stages))


def resolve_stages(stages: list[int], available: int, name: str, model_name: str) -> list[int]:
    """A method's stage list for a model with ``available`` stages (1 to 4).

    The default, all 4, becomes ``1..available``; an explicit stage beyond the model's count is refused.

    Raises:
        ValueError: A stage beyond ``available``, naming the model and its stage count.
    """
    stages = [int(s) for s in stages]
    if stages == [1, 2, 3, 4]:
        return list(range(1, available + 1))
    beyond = [s for s in stages if s > available]
    if beyond:
        raise ValueError(
            f"{name} {stages}: {model_name} has {available} stage(s), so stage(s) {beyond} do not exist. Set "
            f"{name} among 1..{available} (or leave the default, all of them)."
        )
    return stages
