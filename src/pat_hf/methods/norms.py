"""BatchNorm layers for the methods' heads that accept a batch of one value per channel in training mode.

An epoch's last batch may hold a single image (a dataset size one more than a multiple of the batch). A head's
BatchNorm then sees one value per channel where its input is a 1x1 map (or one token): PyTorch's BatchNorm
refuses it in training mode ("Expected more than 1 value per channel"), and a batch variance of one value is
undefined anyway. These subclasses normalise such a batch with the running statistics (as in evaluation) and
leave the statistics unchanged; every other batch goes through PyTorch's BatchNorm untouched. They are plain
subclasses (same parameters, buffers and state-dict keys), so parameter counts and checkpoints do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnyBatchNorm1d", "AnyBatchNorm2d"]


def _single_value_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor | None:
    if not norm.training or norm.running_mean is None or x.numel() // max(x.shape[1], 1) > 1:
        return None
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


class AnyBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that normalises a single value per channel with its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _single_value_forward(self, x)
        return super().forward(x) if out is None else out


class AnyBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises a single value per channel with its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _single_value_forward(self, x)
        return super().forward(x) if out is None else out
