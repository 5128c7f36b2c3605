"""Family rules: the families whose stages (and residual blocks) keep their own rule.

Every other model gets the generic sites of :mod:`.generic`; a family keeps a rule where the generic one is
measurably wrong (transformers' Swin-like stages: hidden states after the stage's own downsampling), where the
paper fixes the stages (MobileNetV2's conv head as stage 4), or for what the generic rule cannot find: the
residual blocks that ``pat_checkpoint_teacher`` recomputes (``_block_modules``). On the timm families the generic
rule finds the same stages (tests/test_any_architecture.py).

Lives here: the family tables (:data:`SUPPORTED_TEACHERS`, :data:`SUPPORTED_STUDENTS`, ``_HF_FAMILIES``), timm
family detection (``_timm_family``), the stage sites of each family (``_timm_sites``, ``_hf_sites``,
``_efficientnet_sites``), its residual blocks (``_block_modules``), the argument names its stage modules receive
their input under (``_HIDDEN_KWARGS``), and the input-size helpers.

Imports only :mod:`.layout` from the package; :mod:`.engine` builds on it.
"""

from __future__ import annotations

import re

from torch import nn

from .layout import _HIERARCHICAL_ENDS, _ISOTROPIC_ENDS, _group_ranges, _Layout, _Site

SUPPORTED_TEACHERS: tuple[str, ...] = (
    "hf_vit",
    "hf_deit",
    "hf_beit",
    "hf_swin",
    "hf_convnext",
    "hf_resnet",
    "hf_timm_wrapper",
)
"""transformers families with their own rule (any other classifier gets the generic sites; not a gate)."""

SUPPORTED_STUDENTS: tuple[str, ...] = (
    "timm_resnet",
    "timm_convnext",
    "timm_efficientnet",
    "timm_mobilenetv2",
    "timm_mobilenetv3",
    "timm_vit",
    "timm_swin",
    "timm_mixer",
    "timm_resmlp",
)
"""timm families with their own rule (ViT covers DeiT, distilled or not; any other timm model gets the generic
sites; not a gate)."""


_HF_FAMILIES = {
    "vit": "hf_vit",
    "deit": "hf_deit",
    "beit": "hf_beit",
    "swin": "hf_swin",
    "convnext": "hf_convnext",
    "resnet": "hf_resnet",
    "timm_wrapper": "hf_timm_wrapper",
}


def _first(module: nn.Module) -> nn.Module:
    """The first sub-block of a block group (the group itself when it is not a container)."""
    return module[0] if isinstance(module, nn.Sequential) and len(module) > 0 else module


def _last(module: nn.Module) -> nn.Module:
    """The last sub-block of a block group (the group itself when it is not a container)."""
    return module[-1] if isinstance(module, nn.Sequential) and len(module) > 0 else module


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _sites_from_blocks(
    blocks: nn.ModuleList | nn.Sequential,
    layout: _Layout,
    ends: tuple[float, ...],
    prefix_tokens: int = 0,
    grid: tuple[int, int] | None = None,
) -> list[_Site]:
    return [
        _Site(blocks[start], blocks[stop - 1], layout, prefix_tokens, grid)
        for start, stop in _group_ranges(len(blocks), ends)
    ]


def _get_attr_path(obj: object, *paths: str) -> nn.Module | None:
    """The first attribute path (dotted) that exists on ``obj``; transformers 5 moved ``encoder.layer`` to ``layers``."""
    for path in paths:
        current = obj
        for name in path.split("."):
            current = getattr(current, name, None)
            if current is None:
                break
        if current is not None:
            return current
    return None


def _timm_image_size(model: nn.Module) -> tuple[int, int]:
    """The input size a timm model was built for: fixed-size models (ViT, Swin, Mixer) first."""
    for embed_name in ("patch_embed", "stem"):
        img_size = getattr(getattr(model, embed_name, None), "img_size", None)
        if img_size is not None:
            return _pair(img_size)
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if input_size is not None:
        return int(input_size[-2]), int(input_size[-1])
    return 224, 224


def _timm_token_grid(patch_embed: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    if hasattr(patch_embed, "dynamic_feat_size"):
        return _pair(patch_embed.dynamic_feat_size(image_size))
    patch = _pair(patch_embed.patch_size)
    return image_size[0] // patch[0], image_size[1] // patch[1]


def _efficientnet_sites(model: nn.Module, family: str) -> list[_Site]:
    """EfficientNet / MobileNet stages from ``feature_info``: the last block group at reductions 4, 8, 16, 32.

    Sub-blocks are hooked rather than block groups because timm's gradient checkpointing flattens the groups
    (``checkpoint_seq(..., flatten=True)``), which would silently skip hooks on the groups themselves.
    """
    by_reduction: dict[int, str] = {}
    for info in model.feature_info:
        by_reduction[int(info["reduction"])] = info["module"]  # later entries win: the last module per reduction
    wanted = (4, 8, 16) if family == "timm_mobilenetv2" else (4, 8, 16, 32)
    group_indices = []
    for reduction in wanted:
        match = re.fullmatch(r"blocks\.(\d+)", by_reduction.get(reduction, ""))
        if match is None:
            raise ValueError(f"{family}: no block group at reduction {reduction} in feature_info {model.feature_info}")
        group_indices.append(int(match.group(1)))
    blocks = model.blocks
    sites = []
    start = 0
    for index in group_indices:
        sites.append(_Site(_first(blocks[start]), _last(blocks[index]), "map"))
        start = index + 1
    if family == "timm_mobilenetv2":
        # As the official PAT code: stage 4 is the 1280-channel conv head, read after its BN + activation.
        if start >= len(blocks):
            raise ValueError("timm_mobilenetv2: no blocks left after reduction 16 for stage 4")
        sites.append(_Site(_first(blocks[start]), model.bn2, "map"))
    return sites


def _timm_family(model: nn.Module) -> str | None:
    try:
        from timm.models import convnext, efficientnet, mlp_mixer, mobilenetv3, resnet, swin_transformer
        from timm.models import vision_transformer as vit
    except ImportError:  # timm absent: no timm model can be passed either
        return None
    architecture = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "")
    if isinstance(model, resnet.ResNet):
        return "timm_resnet"
    if isinstance(model, convnext.ConvNeXt):
        return "timm_convnext"
    if isinstance(model, efficientnet.EfficientNet):
        # timm builds MobileNetV2 with the EfficientNet class; only its name tells them apart.
        return "timm_mobilenetv2" if architecture.startswith("mobilenetv2") else "timm_efficientnet"
    if isinstance(model, mobilenetv3.MobileNetV3):
        return "timm_mobilenetv3"
    if isinstance(model, vit.VisionTransformer):
        return "timm_vit"
    if isinstance(model, swin_transformer.SwinTransformer):
        return "timm_swin"
    if isinstance(model, mlp_mixer.MlpMixer):
        # ResMLP is built with the MlpMixer class, with ResBlock blocks.
        return "timm_resmlp" if isinstance(model.blocks[0], mlp_mixer.ResBlock) else "timm_mixer"
    return None


def _timm_sites(model: nn.Module, family: str, image_size: tuple[int, int]) -> list[_Site]:
    if family == "timm_resnet":
        # Blocks, not layer1..4: timm's gradient checkpointing flattens the layers into their blocks.
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        return [_Site(_first(layer), _last(layer), "map") for layer in layers]
    if family == "timm_convnext":
        return _sites_from_blocks(model.stages, "map", _HIERARCHICAL_ENDS)
    if family in ("timm_efficientnet", "timm_mobilenetv2", "timm_mobilenetv3"):
        return _efficientnet_sites(model, family)
    if family == "timm_vit":
        grid = _timm_token_grid(model.patch_embed, image_size)
        return _sites_from_blocks(model.blocks, "tokens", _ISOTROPIC_ENDS, int(model.num_prefix_tokens), grid)
    if family == "timm_swin":
        # timm Swin stages downsample at their START, so a stage's output is already the pre-downsampling feature.
        return _sites_from_blocks(model.layers, "nhwc", _HIERARCHICAL_ENDS)
    if family in ("timm_mixer", "timm_resmlp"):
        grid = _timm_token_grid(model.stem, image_size)
        return _sites_from_blocks(model.blocks, "tokens", _ISOTROPIC_ENDS, 0, grid)
    raise AssertionError(family)


def _hf_sites(model: nn.Module, family: str, image_size: tuple[int, int]) -> list[_Site]:
    base = getattr(model, "base_model", model)
    config = model.config
    if family in ("hf_vit", "hf_deit", "hf_beit"):
        layers = _get_attr_path(base, "layers", "encoder.layer", "encoder.layers")
        if layers is None:
            raise ValueError(f"{family}: transformer layers not found on {type(base).__name__}")
        patch = _pair(config.patch_size)
        grid = (image_size[0] // patch[0], image_size[1] // patch[1])
        prefix = 2 if family == "hf_deit" else 1  # DeiT: cls + distillation tokens
        return _sites_from_blocks(layers, "tokens", _ISOTROPIC_ENDS, prefix, grid)
    if family == "hf_swin":
        stages = base.encoder.layers
        # A transformers SwinStage runs its blocks and then its OWN downsampling: read its last block instead.
        return [
            _Site(stages[start], stages[stop - 1].blocks[-1], "hf_swin")
            for start, stop in _group_ranges(len(stages), _HIERARCHICAL_ENDS)
        ]
    if family in ("hf_convnext", "hf_resnet"):
        return _sites_from_blocks(base.encoder.stages, "map", _HIERARCHICAL_ENDS)
    raise AssertionError(family)


def _children(container: nn.Module) -> list[nn.Module]:
    return list(container) if isinstance(container, (nn.Sequential, nn.ModuleList)) else [container]


def _block_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The model's residual blocks in forward order: the units :class:`pat_hf.models.recompute.BlockRecompute` can
    recompute in the backward instead of keeping their activations (none known for generic sites)."""
    if family.endswith("_generic"):
        return []
    if family.startswith("hf_timm_wrapper:"):
        return _block_modules(model.timm_model, family.split(":", 1)[1])
    if family.startswith("hf_"):
        base = getattr(model, "base_model", model)
        if family in ("hf_vit", "hf_deit", "hf_beit"):
            return _children(_get_attr_path(base, "layers", "encoder.layer", "encoder.layers"))
        if family == "hf_swin":
            return [block for stage in base.encoder.layers for block in stage.blocks]
        return [block for stage in base.encoder.stages for block in _children(stage.layers)]  # ConvNeXt, ResNet
    if family == "timm_resnet":
        return [
            block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in _children(layer)
        ]
    if family == "timm_convnext":
        return [block for stage in model.stages for block in _children(stage.blocks)]
    if family == "timm_swin":
        return [block for stage in model.layers for block in _children(stage.blocks)]
    if family in ("timm_efficientnet", "timm_mobilenetv2", "timm_mobilenetv3"):
        return [block for group in model.blocks for block in _children(group)]
    return _children(model.blocks)  # timm ViT, Mixer, ResMLP


_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "input", "features", "input_feature")


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None
