"""OFA-KD's branch heads: small classifiers on the student's stage features (training only).

Every distilled student stage gets a small branch head that turns the stage feature into class logits; each
head, and the student's own logits, are trained with the OFA loss against the teacher's logits (see
:func:`pat_hf.losses.ofa_loss`). The heads only exist during training: they live in the method module (so they
are optimised and checkpointed with it) and never reach the exported student.

Head structure (``d_s`` the student's last-stage width, ``d_t`` the teacher's final feature width; ``W =
max(d_s, d_t)`` for convolutional heads and ``W = d_s`` for token heads, as in the official code):

- Convolutional students (map features): stage ``s < 4`` gets ``4 - s`` stride-2 depthwise-separable blocks,
  channels doubling, the last one ending at ``W``; stage 4 gets a 1x1 conv to ``W`` with BN and ReLU. Then global
  average pooling and a linear classifier.
- Transformer / MLP students (token features, or the maps of a timm Swin): Swin patch merging towards a 7x7
  grid, ``max(4 - s, 1)`` ViT blocks with 4 heads at width ``W`` (rounded up to a multiple of 4), then the cls
  token (or the mean of the patch tokens), LayerNorm and a linear classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...models.taps import StageSpec, tokens_to_map
from ..base import init_head_weights
from ..norms import AnyBatchNorm2d

__all__ = [
    "ConvBranchHead",
    "PatchMerging",
    "SepConv",
    "TokenBranchHead",
    "build_branch_head",
    "is_convolutional_family",
    "teacher_feature_dim",
]

TARGET_GRID = 7
HEAD_ATTENTION_HEADS = 4


class SepConv(nn.Module):
    """Stride-2 depthwise-separable block: (dw3x3 -> pw1x1 -> BN -> ReLU) twice, the first dw conv striding.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (reached by the second pointwise conv).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            AnyBatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            AnyBatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """Swin patch merging: concatenates each 2x2 neighbourhood, LayerNorm, then a bias-free Linear.

    Odd grids are zero-padded on the bottom/right first (as timm's Swin does), so any grid can be halved.

    Args:
        in_dim: Channels of the input grid.
        out_dim: Channels of the merged grid.
        activation: Whether a GELU follows (the OFA code uses one between mergers, not after the last).
    """

    def __init__(self, in_dim: int, out_dim: int, activation: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)
        self.act = nn.GELU() if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim)."""
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class ConvBranchHead(nn.Module):
    """Branch head for a convolutional stage feature (B, C, H, W).

    Args:
        spec: Layout of the stage feature (``kind == "map"``).
        stage: The stage number, 1-4; stage ``s < 4`` gets ``4 - s`` downsampling blocks.
        width: Channels before the classifier, ``max(d_s, d_t)``.
        num_classes: Outputs of the classifier.
    """

    def __init__(self, spec: StageSpec, stage: int, width: int, num_classes: int) -> None:
        super().__init__()
        if spec.kind != "map":
            raise ValueError(f"ConvBranchHead needs a map feature, got {spec}.")
        blocks: list[nn.Module] = []
        if stage < 4:
            channels = spec.channels
            num_blocks = 4 - stage
            for i in range(num_blocks):
                out_channels = width if i == num_blocks - 1 else channels * 2
                blocks.append(SepConv(channels, out_channels))
                channels = out_channels
        else:
            # The OFA code uses a bare 1x1 conv here; with BN + ReLU the stage-4 head is not a plain linear map of
            # the pooled feature, like the heads of the earlier stages.
            blocks += [nn.Conv2d(spec.channels, width, 1, bias=False), AnyBatchNorm2d(width), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) stage feature -> (B, num_classes) logits."""
        x = self.blocks(feature)
        return self.classifier(x.mean(dim=(2, 3)))


class TokenBranchHead(nn.Module):
    """Branch head for a transformer / MLP stage feature: tokens (B, P + H·W, C) or a map (B, C, H, W).

    Maps (the stages of a timm Swin) are read as a grid of tokens with no prefix tokens.

    Args:
        spec: Layout of the stage feature.
        stage: The stage number, 1-4; the head has ``max(4 - stage, 1)`` transformer blocks.
        width: Width of the head's blocks (a multiple of ``num_heads``).
        num_classes: Outputs of the classifier.
        num_heads: Attention heads of the blocks.
    """

    def __init__(
        self, spec: StageSpec, stage: int, width: int, num_classes: int, num_heads: int = HEAD_ATTENTION_HEADS
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if width % num_heads:
            raise ValueError(f"The head width {width} must be a multiple of num_heads={num_heads}.")
        self.spec = spec
        self.prefix_tokens = spec.prefix_tokens if spec.kind == "tokens" else 0
        mergers: list[nn.Module] = []
        side, channels = max(spec.height, spec.width), spec.channels
        num_merges = 0
        while side >= 2 * TARGET_GRID:
            side = math.ceil(side / 2)
            num_merges += 1
        for i in range(num_merges):
            mergers.append(PatchMerging(channels, width, activation=i < num_merges - 1))
            channels = width
        self.mergers = nn.Sequential(*mergers)
        self.patch_proj = nn.Identity() if channels == width else nn.Linear(channels, width)
        # Merging cannot carry prefix tokens (they are not on the grid): they bypass it, projected to the width.
        self.prefix_proj = (
            nn.Linear(spec.channels, width) if self.prefix_tokens and spec.channels != width else nn.Identity()
        )
        self.blocks = nn.Sequential(*[Block(dim=width, num_heads=num_heads) for _ in range(max(4 - stage, 1))])
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Stage feature in the spec's layout -> (B, num_classes) logits."""
        if self.spec.kind == "tokens":
            height, width = self.spec.height, self.spec.width
            num_patches = feature.shape[1] - self.prefix_tokens
            if num_patches != height * width:
                # Another input size than the probe's: only a square grid can be recovered from a token count.
                height = width = math.isqrt(num_patches)
            grid, prefix = tokens_to_map(feature, self.prefix_tokens, height, width)
        else:
            grid, prefix = feature, None
        x = self.mergers(grid.permute(0, 2, 3, 1))
        x = self.patch_proj(x.flatten(1, 2))
        if prefix is not None and self.prefix_tokens:
            x = torch.cat([self.prefix_proj(prefix), x], dim=1)
        x = self.blocks(x)
        # The first prefix token is the cls token (timm and transformers put it first; DeiT's distillation token
        # comes second): read it out, as the student's own classifier does; without one, average the patches.
        pooled = x[:, 0] if self.prefix_tokens else x.mean(dim=1)
        return self.classifier(self.norm(pooled))


def build_branch_head(
    spec: StageSpec, stage: int, width: int, num_classes: int, convolutional: bool
) -> ConvBranchHead | TokenBranchHead:
    """The OFA branch head for one student stage, with OFA's initialisation.

    Args:
        spec: Layout of the stage feature.
        stage: The stage number, 1-4.
        width: ``max(d_s, d_t)``; rounded up to a multiple of 4 (the attention heads) for token heads.
        num_classes: Number of classes.
        convolutional: Whether the student is a CNN (map features read by conv blocks). Token features always get
            a token head.

    Returns:
        The head module; it maps a (batch of) stage feature(s) to (B, num_classes) logits.
    """
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"stage must be 1-4, got {stage}.")
    if convolutional and spec.kind == "map":
        head: nn.Module = ConvBranchHead(spec, stage, width, num_classes)
    else:
        width = HEAD_ATTENTION_HEADS * math.ceil(width / HEAD_ATTENTION_HEADS)
        head = TokenBranchHead(spec, stage, width, num_classes)
    init_head_weights(head)
    return head


def teacher_feature_dim(model: nn.Module) -> int | None:
    """The width of a teacher's final stage feature, read from its config, or None when it does not say.

    ``hidden_sizes[-1]`` (ResNet, ConvNeXt, ...), the wrapped timm model's ``num_features`` (TimmWrapper), else
    ``hidden_size`` (ViT, DeiT, BEiT; Swin sets it to its last stage's width).
    """
    config = getattr(model, "config", None)
    hidden_sizes = getattr(config, "hidden_sizes", None)
    if hidden_sizes:
        return int(hidden_sizes[-1])
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and getattr(timm_model, "num_features", None):
        return int(timm_model.num_features)
    hidden_size = getattr(config, "hidden_size", None)
    if isinstance(hidden_size, int) and hidden_size > 0:
        return hidden_size
    return None


# Families whose stage features are tokens on a grid even when a stage returns a map (timm Swin): token heads.
_TOKEN_FAMILIES = frozenset(
    {"timm_vit", "timm_swin", "timm_mixer", "timm_resmlp", "hf_vit", "hf_deit", "hf_beit", "hf_swin"}
)


def is_convolutional_family(family: str) -> bool:
    """Whether a :attr:`pat_hf.models.taps.StageTaps.family` is a CNN (its map features get conv heads).

    A timm Swin returns maps from its stages, but they are transformer tokens on a grid: token heads, as OFA
    gives its Swin students.
    """
    return family.split(":")[-1] not in _TOKEN_FAMILIES
