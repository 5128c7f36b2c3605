"""PAT's adaptive feedback prompts (AFP), computed in closed form.

The prompt block of the paper (and its official code) is

    fusion = Conv1x1(2C->C) -> Conv5x5(C->C) -> Conv1x1 -> SE -> Conv1x1      on cat(x, feedback)
    prompt = Conv1x1(groups 4) -> depthwise Conv5x5 -> Conv1x1 -> SE -> Conv1x1(groups 4)   on fusion (or x)
    output = x + beta * prompt,  beta initialised to 0

where SE returns only its gate ``sigmoid(W2 relu(W1 avgpool(u)))`` of shape (B, C, 1, 1). Everything before
the SE's average pool is affine, so the spatial mean that the SE sees depends on the input only through 25
border-restricted spatial sums (one per 5x5 tap): the region of the input that tap reads. Those sums cost
O(B·C·H·W); the 1x1 and 5x5 convolutions then run on a (B, C, 5, 5) summary instead of the full map, which
turns O(B·C²·H·W·25) into O(B·C·H·W + B·C²·25). The modules and parameters are exactly those of the plain
convolutional block (a reference lives in the tests), so checkpoints and parameter counts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptiveFeedbackPrompt", "SqueezeExciteGate", "pointwise", "region_sums", "tap_windows", "valid_conv"]

KERNEL = 5
PAD = KERNEL // 2


def pointwise(x: torch.Tensor, conv: nn.Conv2d, bias: bool = True) -> torch.Tensor:
    """``conv(x)`` for a 1x1 convolution (any groups) as one matrix product per group (``bias=False``:
    without the convolution's bias).

    The closed form applies its 1x1 convolutions to (B, C, 5, 5) summaries and (B, C, 1, 1) gates; on maps
    that small, oneDNN's convolution kernels (and above all their backward) cost several times the GEMM.
    Batch and positions form one matrix dimension, so the weight's gradient is a single product too (a
    per-sample broadcast weight would materialise B copies of it).
    """
    batch, channels = x.shape[:2]
    groups = conv.groups
    weight = conv.weight.view(groups, conv.out_channels // groups, channels // groups)
    columns = x.reshape(batch, groups, channels // groups, -1).permute(1, 2, 0, 3)  # (g, in/g, B, positions)
    y = torch.bmm(weight, columns.reshape(groups, channels // groups, -1))  # (g, out/g, B · positions)
    y = y.view(groups, conv.out_channels // groups, batch, -1).permute(2, 0, 1, 3)
    y = y.reshape(batch, conv.out_channels, *x.shape[2:])
    return y if conv.bias is None or not bias else y + conv.bias.view(1, -1, *([1] * (x.dim() - 2)))


def valid_conv(v: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The (B, C_out, 1, 1) output of ``conv`` (k x k, any groups, bias left out) over a (B, C_in, k, k) input
    without padding, as one matrix product per group (see :func:`pointwise`)."""
    batch = v.shape[0]
    groups = conv.groups
    weight = conv.weight.reshape(groups, conv.out_channels // groups, -1)  # (g, out/g, in/g · k · k)
    rows = v.reshape(batch, groups, -1).transpose(0, 1)  # (g, B, in/g · k · k)
    y = torch.bmm(rows, weight.transpose(1, 2))  # (g, B, out/g)
    return y.transpose(0, 1).reshape(batch, conv.out_channels, 1, 1)


class SqueezeExciteGate(nn.Module):
    """Squeeze-and-excitation that returns its gate ``sigmoid(W2 relu(W1 avgpool(u)))``, shape (B, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.gate_from_mean(u.mean(dim=(2, 3), keepdim=True))

    def gate_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The gate given the spatial mean (B, C, 1, 1) directly (the closed form computes that mean)."""
        return torch.sigmoid(pointwise(F.relu(pointwise(mean, self.reduce)), self.expand))


def tap_windows(size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(5, size) indicator: row ``i`` marks the positions that tap ``i`` of a 5-wide, padding-2 convolution
    reads along one axis of length ``size``, i.e. ``[max(0, i-2), size + min(0, i-2))``."""
    positions = torch.arange(size, device=device)
    offsets = torch.arange(KERNEL, device=device)[:, None] - PAD
    return ((positions >= offsets.clamp(min=0)) & (positions < size + offsets.clamp(max=0))).to(dtype)


def region_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``x`` over the region each tap of a 5x5, padding-2 convolution reads.

    For kernel index (i, j) the convolution reads input rows ``[max(0, i-2), H + min(0, i-2))`` and the
    matching columns (:func:`tap_windows`). The 25 sums are one matrix product of the map's H·W positions with
    a (25, H·W) indicator: it reads the map once, and its backward writes the map's gradient once (rather than
    summing several full-size slice gradients). A map that is a channels-last view (a token grid) is taken as
    (B, H·W, C) as it lies in memory, without a copy.

    Args:
        x: (B, C, H, W).

    Returns:
        ``(sums, counts)``: sums (B, C, 5, 5) and the number of input positions per tap (5, 5), both in x's
        dtype. Taps that read nothing (|offset| >= size) have sum and count 0.
    """
    batch, channels, height, width = x.shape
    rows = tap_windows(height, x.device, x.dtype)
    cols = tap_windows(width, x.device, x.dtype)
    windows = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(KERNEL * KERNEL, height * width)
    if x.stride(1) == 1 and not x.is_contiguous():
        sums = (windows @ x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)).transpose(1, 2)
    else:
        sums = x.reshape(batch, channels, height * width) @ windows.t()
    counts = rows.sum(1)[:, None] * cols.sum(1)[None, :]
    return sums.reshape(batch, channels, KERNEL, KERNEL), counts


def _affine_mean(parts: list[torch.Tensor], first: nn.Conv2d, spatial: nn.Conv2d, after: nn.Conv2d) -> torch.Tensor:
    """Spatial mean of ``after(spatial(first(cat(parts, dim=1))))`` without running the 5x5 conv over the map.

    ``first`` is 1x1 (any groups), ``spatial`` 5x5 with padding 2 (any groups), ``after`` 1x1. Region sums
    are taken per part: they are per-channel, so concatenating the small summaries equals summarising the
    concatenated map, without a full-size copy of it.
    """
    height, width = parts[0].shape[-2:]
    summaries = [region_sums(part) for part in parts]
    sums, counts = torch.cat([summary for summary, _ in summaries], dim=1), summaries[0][1]
    # Region sums of first(x): the 1x1 conv maps sums linearly, its bias counts once per position.
    v = pointwise(sums, first, bias=False)
    if first.bias is not None:
        v = v + first.bias.view(1, -1, 1, 1) * counts
    # A 'valid' 5x5 conv over the (5, 5) summary = the sum of the padded conv's output over all positions.
    mean = valid_conv(v, spatial) / (height * width)
    if spatial.bias is not None:
        mean = mean + spatial.bias.view(1, -1, 1, 1)
    return pointwise(mean, after)


class AdaptiveFeedbackPrompt(nn.Module):
    """One adaptive feedback prompt at the input of a teacher stage.

    Args:
        channels: C of the stage input map.
        feedback_channels: Channels of the feedback map as handed to the block (equal to ``channels``; the
            feedback aligner runs before). None disables the fusion branch (prompts without feedback).
        reduction: SE reduction ratio.
        spatial: Use ``u * gate`` instead of the gate alone in the prompt branch's SE (a spatial prompt; not
            the published behaviour, and computed with the plain convolutions).
    """

    def __init__(self, channels: int, feedback: bool = True, reduction: int = 16, spatial: bool = False) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"prompt blocks use groups of 4: stage input channels ({channels}) must divide by 4")
        c = channels
        self.spatial = spatial
        if feedback:
            self.fuse_in = nn.Conv2d(2 * c, c, 1)
            self.fuse_spatial = nn.Conv2d(c, c, KERNEL, padding=PAD)
            self.fuse_mix = nn.Conv2d(c, c, 1)
            self.fuse_se = SqueezeExciteGate(c, reduction)
            self.fuse_out = nn.Conv2d(c, c, 1)
        self.prompt_in = nn.Conv2d(c, c, 1, groups=4)
        self.prompt_spatial = nn.Conv2d(c, c, KERNEL, padding=PAD, groups=c)
        self.prompt_mix = nn.Conv2d(c, c, 1)
        self.prompt_se = SqueezeExciteGate(c, reduction)
        self.prompt_out = nn.Conv2d(c, c, 1, groups=4)
        # beta = 0: at initialisation the prompted teacher equals the plain teacher exactly.
        self.beta = nn.Parameter(torch.zeros(()))

    @property
    def has_feedback_branch(self) -> bool:
        return hasattr(self, "fuse_in")

    def prompt(self, x: torch.Tensor, feedback: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt (B, C, 1, 1) (or (B, C, H, W) for the spatial variant) for input x and feedback."""
        source = x
        if feedback is not None and self.has_feedback_branch:
            gate = self.fuse_se.gate_from_mean(
                _affine_mean([x, feedback], self.fuse_in, self.fuse_spatial, self.fuse_mix)
            )
            source = pointwise(gate, self.fuse_out)  # (B, C, 1, 1): the SE gate is spatially constant
        if self.spatial:
            u = self.prompt_mix(self.prompt_spatial(self.prompt_in(source)))
            return self.prompt_out(u * self.prompt_se(u))
        gate = self.prompt_se.gate_from_mean(
            _affine_mean([source], self.prompt_in, self.prompt_spatial, self.prompt_mix)
        )
        return pointwise(gate, self.prompt_out)

    def forward(self, x: torch.Tensor, feedback: torch.Tensor | None = None) -> torch.Tensor:
        """``x + beta * prompt(x, feedback)``; x is (B, C, H, W), feedback (B, C, H, W) or None."""
        return x + self.beta.to(x.dtype) * self.prompt(x, feedback).to(x.dtype)
