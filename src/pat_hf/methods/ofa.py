"""OFA-KD (Hao et al., "One-for-All", NeurIPS 2023): branch heads on the student's stages learn the teacher's
logits.

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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import cross_entropy, ofa_loss
from ..student import student_logits, student_num_classes
from ..taps import StageSpec, tokens_to_map
from ..teacher import Teacher
from .base import DistillationBatch, DistillationMethod, DistillationOutput, register_method

if TYPE_CHECKING:
    from ..configuration import PATTrainingArguments

__all__ = [
    "ConvBranchHead",
    "OFADistillation",
    "PatchMerging",
    "SepConv",
    "TokenBranchHead",
    "build_branch_head",
    "is_convolutional_family",
    "teacher_feature_dim",
]

# The token heads merge patches until the grid is about this side (49 tokens), as in the OFA code.
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
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
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
            blocks += [nn.Conv2d(spec.channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
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
    head.apply(_init_weights)
    return head


def _init_weights(module: nn.Module) -> None:
    # OFA's initialisation of its heads (Kaiming fan-out for convs, truncated normal 0.02 for linears).
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


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
    """Whether a :attr:`pat_hf.taps.StageTaps.family` is a CNN (its map features get conv heads).

    A timm Swin returns maps from its stages, but they are transformer tokens on a grid: token heads, as OFA
    gives its Swin students.
    """
    return family.split(":")[-1] not in _TOKEN_FAMILIES


@register_method
class OFADistillation(DistillationMethod):
    """OFA-KD: ``w_ce·CE(z_s, y) + w_kd·OFA(z_s, z_t; ε_final) + w_ofa·Σ_s OFA(head_s(F_s), z_t; ε_s)``.

    One branch head per stage in ``args.ofa_stages``; see the module docstring for their structure. The student's
    stage features are read by forward hooks (:func:`pat_hf.taps.build_taps`) during the single student forward
    of a training step; evaluation uses the student alone.

    Args:
        args: Training arguments (``ofa_epsilon``, ``ofa_weight``, ``ofa_stages``, weights, temperature).
        student: The student; its stage layouts decide the heads.
        teacher: The frozen teacher (its final feature width sets the heads' width).
    """

    name = "ofa"
    default_temperature = 1.0
    # The OFA recipes train with label smoothing 0.1 (see docs), like PAT.
    default_label_smoothing = 0.1
    description = "OFA-KD: branch heads on the student's stages learn the teacher's logits"

    def __init__(self, args: PATTrainingArguments, student: nn.Module, teacher: Teacher | None) -> None:
        super().__init__(args, student, teacher)
        from ..taps import build_taps

        self.stages = [int(s) for s in args.ofa_stages]
        # PATTrainingArguments already checked the count: one value per stage plus the final logits, or one.
        eps = [float(e) for e in args.ofa_epsilon]
        if len(eps) == 1:
            eps = eps * (len(self.stages) + 1)
        self.epsilon = eps
        self.ofa_weight = float(args.ofa_weight)

        num_classes = student_num_classes(student)
        if num_classes is None:
            raise ValueError(f"Cannot tell the number of classes of the student {type(student).__name__}.")
        # The taps only hold forward hooks on the student: a plain attribute, so no parameter or state is duplicated.
        self._taps = build_taps(student)
        self.specs: list[StageSpec] = list(self._taps.output_specs)
        student_dim = self.specs[-1].channels
        teacher_dim = teacher_feature_dim(teacher.model) if teacher is not None else None
        self.head_width = max(student_dim, teacher_dim or student_dim)
        convolutional = is_convolutional_family(self._taps.family)
        if not convolutional:
            # As in the official code: token heads work at the student's own width (max(d_s, d_t) would make a
            # DeiT-T student's heads 14x larger with a 768-wide teacher).
            self.head_width = student_dim
        self.heads = nn.ModuleDict(
            {
                f"s{stage}": build_branch_head(
                    self.specs[stage - 1], stage, self.head_width, num_classes, convolutional
                )
                for stage in self.stages
            }
        )

    def forward(self, student: nn.Module, teacher: Teacher | None, batch: DistillationBatch) -> DistillationOutput:
        """One training step: a student forward (stage features captured), the teacher's logits, the OFA loss."""
        if teacher is None or batch.teacher_pixel_values is None:
            raise ValueError("distill_method='ofa' needs a teacher and teacher inputs in every training batch.")
        with self._taps.capture() as features:
            logits = student_logits(student, batch.pixel_values)
        if len(features) != len(self.specs):
            raise RuntimeError(
                f"Captured {len(features)} stage features from the student, expected {len(self.specs)}: was the "
                "student passed to the method the one it was built for?"
            )
        with torch.no_grad():
            teacher_logits = teacher(batch.teacher_pixel_values)
        stage_features = {stage: features[stage - 1] for stage in self.stages}
        return self.compute_loss(logits, stage_features, teacher_logits, batch.labels)

    def compute_loss(
        self,
        logits: torch.Tensor,
        stage_features: dict[int, torch.Tensor],
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> DistillationOutput:
        """The OFA loss from the student's logits and stage features (the heads run here).

        Args:
            logits: Student logits (B, K).
            stage_features: Stage number -> stage feature, for every stage in ``ofa_stages``.
            teacher_logits: Teacher logits (B, K), no gradient taken.
            labels: Class indices (B,), or None (no CE; the OFA targets are the teacher's alone).

        Returns:
            The weighted loss, the student logits and the unweighted, detached parts ``ce``, ``ofa`` (final logits)
            and ``ofa_s1`` ... ``ofa_s4``.
        """
        parts: dict[str, torch.Tensor] = {}
        final = ofa_loss(logits, teacher_logits, labels, self.epsilon[-1], self.temperature)
        loss = self.kd_weight * final
        parts["ofa"] = final.detach()
        if labels is not None:
            ce = cross_entropy(logits, labels, self.label_smoothing)
            loss = loss + self.ce_weight * ce
            parts["ce"] = ce.detach()
        branch_total = logits.new_zeros((), dtype=torch.float32)
        for stage, eps in zip(self.stages, self.epsilon):
            head_logits = self.heads[f"s{stage}"](stage_features[stage])
            branch = ofa_loss(head_logits, teacher_logits, labels, eps, self.temperature)
            branch_total = branch_total + branch
            parts[f"ofa_s{stage}"] = branch.detach()
        loss = loss + self.ofa_weight * branch_total
        return DistillationOutput(loss=loss, logits=logits, parts=parts)

    def head_parameters(self) -> int:
        """Number of parameters of the branch heads (all trainable)."""
        return sum(p.numel() for p in self.heads.parameters())

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.update(ofa_epsilon=list(self.epsilon), ofa_weight=self.ofa_weight, ofa_stages=list(self.stages))
        return settings
