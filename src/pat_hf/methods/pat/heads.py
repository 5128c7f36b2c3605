"""PAT's student-side heads: region-aware attention (RAA) over the student's stages, the aligners to the
teacher's stages, and the feedback aligners that bring the feedback to a prompted stage's input shape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...models.taps import StageSpec, as_map
from ..norms import AnyBatchNorm1d, AnyBatchNorm2d

__all__ = [
    "FeedbackAligner",
    "RegionAwareAttention",
    "StageAligner",
    "region_grid",
    "sinusoidal_positions",
    "upsample_then_project",
]


def region_grid(num_queries: int, num_stages: int = 4) -> int:
    """The side of each stage's square grid of region tokens: ``num_queries / num_stages`` must be a square.

    Raises:
        ValueError: When it is not (64 queries: a 4x4 grid per stage).
    """
    per_stage = num_queries // num_stages if num_queries > 0 else 0
    grid = math.isqrt(per_stage)
    if per_stage * num_stages != num_queries or grid < 1 or grid * grid != per_stage:
        raise ValueError(
            f"pat_num_queries must be {num_stages} x a square number (16 regions per stage for 64), got {num_queries}."
        )
    return grid


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine encoding of token positions 0..length-1, shape (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: table[:, 1::2].shape[1]])
    return table


class RegionAwareAttention(nn.Module):
    """Region tokens from every student stage, mixed by one multi-head attention.

    Per stage: the map is nearest-upsampled to a side divisible by the region grid, then a patch-embedding
    conv (kernel = stride = side / grid) turns it into ``grid²`` tokens of width D. The tokens of all stages are
    concatenated, layer-normed and attended (q from a Linear(D, D), k and v from a Linear(D, 2D), a fixed
    sinusoidal encoding of each TOKEN position added to q and k; the official code indexed it by batch
    position). The output is ``softmax(q k^T / sqrt(d)) v`` with no output projection and no residual, split
    back per stage.

    Args:
        student_specs: The student's 4 stage specs.
        num_queries: Total region tokens Nq (Nq / 4 per stage, a square).
        dim: Width D.
        num_heads: Attention heads.
    """

    def __init__(
        self, student_specs: list[StageSpec], num_queries: int = 64, dim: int = 512, num_heads: int = 8
    ) -> None:
        super().__init__()
        self.specs = list(student_specs)
        # Nq / 4 region tokens per stage whatever the stage count (a model with 3 stages gets 3 x Nq / 4 tokens).
        self.grid = region_grid(num_queries)
        self.dim, self.num_heads = dim, num_heads
        self.kernels = []
        embeds = []
        for spec in self.specs:
            kernel = (math.ceil(spec.height / self.grid), math.ceil(spec.width / self.grid))
            self.kernels.append(kernel)
            embeds.append(nn.Conv2d(spec.channels, dim, kernel_size=kernel, stride=kernel))
        self.embed = nn.ModuleList(embeds)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        length = self.grid * self.grid * len(self.specs)
        self.register_buffer("positions", sinusoidal_positions(length, dim), persistent=False)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Maps the 4 student stage features to 4 × (B, grid², D) attended region tokens."""
        tokens = []
        for feature, spec, kernel, embed in zip(features, self.specs, self.kernels, self.embed):
            x = as_map(feature, spec)
            side = (kernel[0] * self.grid, kernel[1] * self.grid)
            if tuple(x.shape[-2:]) != side:
                x = F.interpolate(x, size=side, mode="nearest")
            tokens.append(embed(x).flatten(2).transpose(1, 2))
        x = self.norm(torch.cat(tokens, dim=1))
        batch, length, _ = x.shape
        pos = self.positions[:length].to(x.dtype)
        q = self.q(x) + pos
        k, v = self.kv(x).chunk(2, dim=-1)
        k = k + pos
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(batch, length, self.dim)
        return list(out.split(self.grid * self.grid, dim=1))


def upsample_then_project(x: torch.Tensor, size: tuple[int, int], norm: nn.Module, proj: nn.Module) -> torch.Tensor:
    """``proj(norm(nearest_upsample(x, size)))``, computed on the small map when the factor is an integer.

    Nearest upsampling by an integer factor repeats every cell the same number of times, so a BatchNorm's
    batch statistics and a 1x1 convolution give the same values before and after it: running them first on
    the small grid is exact (only BN's running variance differs, through its n/(n-1) correction, and these
    modules never run in eval mode) and costs up to (H/h)² times fewer operations and less memory.
    """
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return proj(norm(x))
    if size[0] % height == 0 and size[1] % width == 0:
        return F.interpolate(proj(norm(x)), size=size, mode="nearest")
    return proj(norm(F.interpolate(x, size=size, mode="nearest")))


class StageAligner(nn.Module):
    """Maps (B, grid², D) region tokens to the teacher's stage output, returned as a (B, C_t, H_t, W_t) map.

    As the official modules, to the parameter:

    - map teachers: grid² tokens -> (D, grid, grid) -> nearest upsample to (H_t, W_t) -> BatchNorm2d(D) -> bias-free
      1x1 conv (D -> C_t);
    - token teachers: BatchNorm1d over the grid² tokens (as channels), Linear(D -> C_t); then, transposed,
      BatchNorm1d over the C_t channels, Linear(grid² -> H_t·W_t) (patch tokens only), reshaped to the patch grid.
    """

    def __init__(self, teacher_spec: StageSpec, num_tokens: int, dim: int = 512) -> None:
        super().__init__()
        self.spec = teacher_spec
        self.grid = math.isqrt(num_tokens)
        if teacher_spec.kind == "map":
            self.norm = AnyBatchNorm2d(dim)
            self.proj = nn.Conv2d(dim, teacher_spec.channels, 1, bias=False)
        else:
            self.token_norm = AnyBatchNorm1d(num_tokens)
            self.proj = nn.Linear(dim, teacher_spec.channels)
            self.channel_norm = AnyBatchNorm1d(teacher_spec.channels)
            self.token_proj = nn.Linear(num_tokens, teacher_spec.num_patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, dim = tokens.shape
        spec = self.spec
        if spec.kind == "map":
            x = tokens.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
            return upsample_then_project(x, (spec.height, spec.width), self.norm, self.proj)
        x = self.proj(self.token_norm(tokens))  # (B, grid², C_t)
        x = self.token_proj(self.channel_norm(x.transpose(1, 2)))  # (B, C_t, H_t·W_t)
        return x.reshape(batch, spec.channels, spec.height, spec.width)


class FeedbackAligner(nn.Module):
    """Brings a feedback map from a stage's output shape to its input shape: nearest resize, BN, bias-free 1x1
    conv (as the official module)."""

    def __init__(self, source: StageSpec, target: StageSpec) -> None:
        super().__init__()
        self.size = (target.height, target.width)
        self.norm = AnyBatchNorm2d(source.channels)
        self.proj = nn.Conv2d(source.channels, target.channels, 1, bias=False)

    def forward(self, feedback: torch.Tensor) -> torch.Tensor:
        return upsample_then_project(feedback, self.size, self.norm, self.proj)
