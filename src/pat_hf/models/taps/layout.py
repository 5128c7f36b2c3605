"""Stage layouts: the canonical layout of a stage feature and the conversions between layouts.

Lives here: :class:`StageSpec`, :func:`tokens_to_map` / :func:`map_to_tokens`, the raw layouts a stage can be read
in (``_Layout``), where a stage is read (``_Site``), the number of stages and the rule cutting a model's blocks
into them (the stage-end fractions and ``_group_ranges``).

Imports nothing from the package: :mod:`.families` and :mod:`.engine` build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class StageSpec:
    """Layout of one stage feature, batch dimension excluded.

    Args:
        kind: "map" for (B, C, H, W) tensors, "tokens" for (B, P + H·W, C).
        channels: C.
        height: H of the spatial grid (for tokens: the patch grid).
        width: W of the spatial grid.
        prefix_tokens: P, the tokens before the patch tokens (tokens only).
    """

    kind: Literal["map", "tokens"]
    channels: int
    height: int
    width: int
    prefix_tokens: int = 0

    @property
    def num_patches(self) -> int:
        """H·W, the number of spatial positions."""
        return self.height * self.width

    def shape(self, batch: int) -> tuple[int, ...]:
        """The full tensor shape for a batch."""
        if self.kind == "map":
            return (batch, self.channels, self.height, self.width)
        return (batch, self.prefix_tokens + self.num_patches, self.channels)


def tokens_to_map(
    tokens: torch.Tensor, prefix_tokens: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits (B, P + H·W, C) tokens into a (B, C, H, W) map and the (B, P, C) prefix tokens.

    The transpose before the reshape matters: reshaping (B, L, C) straight to (B, C, H, W) scrambles the
    tokens (a defect of the official PAT code).
    """
    prefix = tokens[:, :prefix_tokens]
    patches = tokens[:, prefix_tokens:]
    batch, length, channels = patches.shape
    if length != height * width:
        raise ValueError(f"{length} patch tokens do not fill a {height}x{width} grid")
    return patches.transpose(1, 2).reshape(batch, channels, height, width), prefix


def map_to_tokens(feature_map: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`tokens_to_map`: (B, C, H, W) (+ (B, P, C) prefix) to (B, P + H·W, C)."""
    tokens = feature_map.flatten(2).transpose(1, 2)
    if prefix is not None and prefix.shape[1] > 0:
        tokens = torch.cat([prefix, tokens], dim=1)
    return tokens


NUM_STAGES = 4

# Where the 4 stages of a 12-block isotropic model end (1-based block counts); scaled for other depths.
_ISOTROPIC_ENDS = (2 / 12, 4 / 12, 10 / 12, 1.0)
_HIERARCHICAL_ENDS = (1 / 4, 2 / 4, 3 / 4, 1.0)

# "map": (B, C, H, W); "nhwc": (B, H, W, C) (timm Swin); "tokens": (B, P + H·W, C) on a fixed patch grid;
# "hf_swin": (B, H·W, C) whose grid is the `input_dimensions` argument of the hooked module.
_Layout = Literal["map", "nhwc", "tokens", "hf_swin"]


def as_map(feature: torch.Tensor, spec: StageSpec) -> torch.Tensor:
    """A stage feature as a (B, C, H, W) map (token features: the patch grid, prefix tokens dropped)."""
    if spec.kind == "map":
        return feature
    return tokens_to_map(feature, spec.prefix_tokens, spec.height, spec.width)[0]


@dataclass
class _Site:
    """Where one stage is read: the input of ``in_module`` and the output of ``out_module``.

    The stage input is rewritten by a forward pre-hook on ``in_module`` (``in_hook="pre"``: its first argument), or
    by a forward hook on it (``in_hook="post"``: its output, when the stage input is another module's output, as
    a transformers hidden state is). ``in_module`` None: the stage has no input site (no prompt can go there).
    ``in_layout`` / ``in_prefix_tokens`` / ``in_grid`` describe the input when it differs from the output's layout.
    """

    in_module: nn.Module | None
    out_module: nn.Module
    layout: _Layout
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None  # patch grid at the probe size, for "tokens"
    in_hook: Literal["pre", "post"] = "pre"
    in_layout: _Layout | None = None
    in_prefix_tokens: int = 0
    in_grid: tuple[int, int] | None = None

    def input_layout(self) -> tuple[_Layout, int, tuple[int, int] | None]:
        """(layout, prefix tokens, grid) of the stage input."""
        if self.in_layout is None:
            return self.layout, self.prefix_tokens, self.grid
        return self.in_layout, self.in_prefix_tokens, self.in_grid


def _group_ranges(num_units: int, ends: tuple[float, ...]) -> list[tuple[int, int]]:
    """Cuts ``num_units`` blocks (or stages) into 4 groups ending at the given fractions of the depth.

    Ends are rounded half up, at least one unit per group and strictly increasing when ``num_units >= 4``.
    With fewer units (tiny test configs) neighbouring groups share a unit: their features are the same tensor
    and their input transforms compose in stage order.

    Returns:
        4 half-open ``(start, end)`` unit ranges.
    """
    if num_units < 1:
        raise ValueError("a model needs at least one block to be cut into stages")
    stops = [min(num_units, max(1, math.floor(num_units * f + 0.5))) for f in ends]
    stops[-1] = num_units
    if num_units >= NUM_STAGES:
        for k in range(NUM_STAGES):
            stops[k] = max(stops[k], stops[k - 1] + 1 if k else 1)
        for k in reversed(range(NUM_STAGES - 1)):
            stops[k] = min(stops[k], stops[k + 1] - 1)
    else:
        for k in range(1, NUM_STAGES):
            stops[k] = max(stops[k], stops[k - 1])
    starts = [0, *stops[:-1]]
    return [(min(start, stop - 1), stop) for start, stop in zip(starts, stops)]
