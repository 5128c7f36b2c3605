"""Stage taps: read (and, for PAT's prompts, rewrite) the 4 stage features of teachers and students.

Every supported model is cut into 4 stages (see docs/methods.md). A stage feature is read in a canonical
layout described by :class:`StageSpec`: a map (B, C, H, W), or tokens (B, P + H·W, C) whose P prefix tokens
(cls, distillation) come FIRST, as in timm and transformers.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "SUPPORTED_STUDENTS",
    "SUPPORTED_TEACHERS",
    "StageSpec",
    "StageTaps",
    "build_taps",
    "map_to_tokens",
    "tokens_to_map",
]


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


# --------------------------------------------------------------------------------------------------------------
# Stage taps
# --------------------------------------------------------------------------------------------------------------

SUPPORTED_TEACHERS: tuple[str, ...] = (
    "hf_vit",
    "hf_deit",
    "hf_beit",
    "hf_swin",
    "hf_convnext",
    "hf_resnet",
    "hf_timm_wrapper",
)
"""Families of transformers classifiers (``hf_timm_wrapper`` wraps any of the timm families below)."""

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
"""Families of timm models (ViT covers DeiT, distilled or not)."""

NUM_STAGES = 4

# Where the 4 stages of a 12-block isotropic model end (1-based block counts); scaled for other depths.
_ISOTROPIC_ENDS = (2 / 12, 4 / 12, 10 / 12, 1.0)
_HIERARCHICAL_ENDS = (1 / 4, 2 / 4, 3 / 4, 1.0)

# "map": (B, C, H, W); "nhwc": (B, H, W, C) (timm Swin); "tokens": (B, P + H·W, C) on a fixed patch grid;
# "hf_swin": (B, H·W, C) whose grid is the `input_dimensions` argument of the hooked module.
_Layout = Literal["map", "nhwc", "tokens", "hf_swin"]


@dataclass
class _Site:
    """Where one stage is read: the input of ``in_module`` and the output of ``out_module``."""

    in_module: nn.Module
    out_module: nn.Module
    layout: _Layout
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None  # patch grid at the probe size, for "tokens"


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


def _hf_swin_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
    if dims is None:
        raise RuntimeError("hf_swin: the hooked module was called without input_dimensions")
    return int(dims[0]), int(dims[1])


def _children(container: nn.Module) -> list[nn.Module]:
    return list(container) if isinstance(container, (nn.Sequential, nn.ModuleList)) else [container]


def _block_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The model's residual blocks in forward order: the units :class:`pat_hf.recompute.BlockRecompute` can
    recompute in the backward instead of keeping their activations."""
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


class StageTaps:
    """Forward hooks on a model's 4 stage modules (no monkey-patching of any class, no forward rewriting).

    Build it with :func:`build_taps`. Stages are indexed 0..3.

    Attributes:
        family: The detected family, e.g. ``"hf_vit"``, ``"timm_resnet"``, ``"hf_timm_wrapper:timm_resnet"``.
        blocks: The model's residual blocks in forward order (what PAT can recompute in the backward).
        output_specs: Layout of each stage's output, in canonical layout (4 entries).
        input_specs: Layout of each stage's input as a ``"map"`` spec of its patch grid (prefix tokens excluded).

    The hooks hold only weak references to the taps and to the hooked modules, and do nothing when fired on a
    different module: a ``copy.deepcopy`` of a tapped model (e.g. an EMA copy) behaves as an untapped model.
    Call :meth:`remove` before pickling a whole tapped model.
    """

    family: str
    output_specs: list[StageSpec]
    input_specs: list[StageSpec]
    blocks: list[nn.Module]

    def __init__(self, family: str, sites: list[_Site]) -> None:
        if len(sites) != NUM_STAGES:
            raise ValueError(f"expected {NUM_STAGES} stage sites, got {len(sites)}")
        self.family = family
        self.blocks = []
        self.output_specs = []
        self.input_specs = []
        self._sites = sites
        self._transforms: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._sinks: list[list[torch.Tensor | None]] = []
        self._probe: dict[str, dict[int, StageSpec]] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    # -- hooks ---------------------------------------------------------------------------------------------

    def _install(self) -> None:
        inputs: dict[int, tuple[nn.Module, list[int]]] = {}
        outputs: dict[int, tuple[nn.Module, list[int]]] = {}
        for index, site in enumerate(self._sites):
            inputs.setdefault(id(site.in_module), (site.in_module, []))[1].append(index)
            outputs.setdefault(id(site.out_module), (site.out_module, []))[1].append(index)
        taps_ref = weakref.ref(self)
        for module, stages in inputs.values():
            hook = _make_pre_hook(taps_ref, weakref.ref(module), tuple(stages))
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, stages in outputs.values():
            hook = _make_post_hook(taps_ref, weakref.ref(module), tuple(stages))
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _token_grid(self, site: _Site, num_patches: int) -> tuple[int, int]:
        if site.grid is not None and site.grid[0] * site.grid[1] == num_patches:
            return site.grid
        # Another input size than the probe's: only a square grid can be recovered from a token count.
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{self.family}: cannot infer the patch grid of {num_patches} tokens")
        return side, side

    def _stage_input(self, stages: tuple[int, ...], args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        active = [i for i in stages if i in self._transforms]
        if self._probe is None and not active:
            return None
        key = None
        if args:
            x = args[0]
        else:
            key = next((k for k in _HIDDEN_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)
            if key is None:
                raise RuntimeError(f"{self.family}: stage input tensor not found in the call's arguments")
            x = kwargs[key]
        site = self._sites[stages[0]]  # stages sharing an input module share its layout
        feature_map, restore = self._input_to_map(site, x, args, kwargs)
        if self._probe is not None:
            for i in stages:
                self._probe["in"][i] = StageSpec("map", *feature_map.shape[1:])
        if not active:
            return None
        for i in active:
            new_map = self._transforms[i](feature_map)
            if new_map.shape != feature_map.shape:
                raise ValueError(
                    f"the input transform of stage {i} returned shape {tuple(new_map.shape)}, "
                    f"expected {tuple(feature_map.shape)}"
                )
            feature_map = new_map
        new_x = restore(feature_map)
        # Same memory layout as the original, so that an identity transform leaves every kernel's result unchanged.
        if x.is_contiguous():
            new_x = new_x.contiguous()
        elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            new_x = new_x.contiguous(memory_format=torch.channels_last)
        if args:
            return (new_x, *args[1:]), kwargs
        return args, {**kwargs, key: new_x}

    def _input_to_map(
        self, site: _Site, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The stage input as a (B, C, H, W) map, and the function putting a map back in the input's layout."""
        if site.layout == "map":
            return x, lambda m: m
        if site.layout == "nhwc":
            return x.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
        if site.layout == "hf_swin":
            height, width = _hf_swin_grid(args, kwargs)
            feature_map, _ = tokens_to_map(x, 0, height, width)
            return feature_map, map_to_tokens
        height, width = self._token_grid(site, x.shape[1] - site.prefix_tokens)
        feature_map, prefix = tokens_to_map(x, site.prefix_tokens, height, width)
        return feature_map, lambda m: map_to_tokens(m, prefix)

    def _stage_output(self, stages: tuple[int, ...], args: tuple, kwargs: dict, output: object) -> None:
        if self._probe is None and not self._sinks:
            return
        # Older transformers layers return tuples (hidden_states, attentions, ...).
        feature = output if isinstance(output, torch.Tensor) else output[0]
        site = self._sites[stages[0]]
        if site.layout == "nhwc":
            feature = feature.permute(0, 3, 1, 2)
        if self._probe is not None:
            if site.layout in ("map", "nhwc"):
                spec = StageSpec("map", *feature.shape[1:])
            else:
                prefix = site.prefix_tokens
                if site.layout == "hf_swin":
                    grid = _hf_swin_grid(args, kwargs)
                else:
                    grid = self._token_grid(site, feature.shape[1] - prefix)
                spec = StageSpec("tokens", feature.shape[2], grid[0], grid[1], prefix)
                if spec.shape(feature.shape[0]) != tuple(feature.shape):
                    raise RuntimeError(f"{self.family}: stage output {tuple(feature.shape)} does not match {spec}")
            for i in stages:
                self._probe["out"][i] = spec
        if self._sinks:
            sink = self._sinks[-1]
            if len(sink) < NUM_STAGES:
                sink.extend([None] * (NUM_STAGES - len(sink)))
            for i in stages:
                sink[i] = feature

    # -- public API ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Captures the 4 stage outputs of every forward run inside the block.

        After a forward, the yielded list holds 4 tensors, entry ``i`` being stage ``i``'s output of the most
        recent forward in canonical layout (maps (B, C, H, W), tokens (B, P + H·W, C) with prefix tokens first),
        attached to the autograd graph. Forwards outside the block record nothing; nested blocks capture into
        the innermost list. The taps drop their reference to the list on exit; the list itself is left as is.

        Yields:
            The list that forwards fill.
        """
        sink: list[torch.Tensor | None] = []
        self._sinks.append(sink)
        try:
            yield sink  # type: ignore[misc]
        finally:
            for position in range(len(self._sinks) - 1, -1, -1):
                if self._sinks[position] is sink:
                    del self._sinks[position]
                    break

    def set_input_transforms(self, transforms: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None) -> None:
        """Replaces the input of the given stages by a transform of it, for every later forward.

        Args:
            transforms: Stage index (0..3) to a callable receiving the stage input's patch grid as a map
                (B, C, H, W) and returning a map of the same shape. Prefix tokens bypass it unchanged; the taps
                convert tokens and NHWC inputs to and from the map. ``None`` (or ``{}``) removes all transforms.
                Stages that share a block (models with fewer than 4 blocks or stages) apply theirs in order.

        Raises:
            ValueError: On a stage index outside 0..3 or a non-callable transform.
        """
        transforms = dict(transforms or {})
        for index, transform in transforms.items():
            if not isinstance(index, int) or not 0 <= index < NUM_STAGES:
                raise ValueError(f"stage indices are 0..{NUM_STAGES - 1}, got {index!r}")
            if not callable(transform):
                raise ValueError(f"the transform of stage {index} is not callable")
        self._transforms = transforms

    @property
    def input_transforms(self) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """A copy of the current input transforms, to restore them after a forward without them."""
        return dict(self._transforms)

    def remove(self) -> None:
        """Removes all hooks; the model then runs exactly as an untapped one. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._transforms = {}
        self._sinks.clear()

    def _run_probe(self, model: nn.Module, image_size: tuple[int, int], in_channels: int) -> None:
        """One no-grad forward in eval mode (no batch-statistics update, no dropout) to read the 4 specs."""
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        dummy = torch.zeros(1, in_channels, *image_size, device=device, dtype=dtype)
        modes = [(module, module.training) for module in model.modules()]
        saved_transforms, self._transforms = self._transforms, {}
        self._probe = {"in": {}, "out": {}}
        try:
            model.eval()
            with torch.no_grad():
                model(dummy)
            probe = self._probe
        finally:
            self._probe = None
            self._transforms = saved_transforms
            for module, training in modes:
                module.training = training
        missing = [i for i in range(NUM_STAGES) if i not in probe["in"] or i not in probe["out"]]
        if missing:
            raise RuntimeError(f"{self.family}: the probe forward did not run stage(s) {missing}")
        self.input_specs = [probe["in"][i] for i in range(NUM_STAGES)]
        self.output_specs = [probe["out"][i] for i in range(NUM_STAGES)]


def _make_pre_hook(taps_ref: weakref.ref, module_ref: weakref.ref, stages: tuple[int, ...]) -> Callable:
    # A plain closure over weak references: deepcopy treats functions as atomic, so a copied model keeps this
    # very hook, which must then ignore the copy's module (identity check) and never keep the taps alive.
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        taps = taps_ref()
        if taps is None or module is not module_ref():
            return None
        return taps._stage_input(stages, args, kwargs)

    return hook


def _make_post_hook(taps_ref: weakref.ref, module_ref: weakref.ref, stages: tuple[int, ...]) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        taps = taps_ref()
        if taps is None or module is not module_ref():
            return
        taps._stage_output(stages, args, kwargs, output)

    return hook


_HF_FAMILIES = {
    "vit": "hf_vit",
    "deit": "hf_deit",
    "beit": "hf_beit",
    "swin": "hf_swin",
    "convnext": "hf_convnext",
    "resnet": "hf_resnet",
    "timm_wrapper": "hf_timm_wrapper",
}


def _unsupported(model: nn.Module) -> ValueError:
    return ValueError(
        f"cannot tap the stages of a {type(model).__name__}: supported teachers (transformers) are "
        f"{', '.join(SUPPORTED_TEACHERS)}; supported students (timm) are {', '.join(SUPPORTED_STUDENTS)}"
    )


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def build_taps(model: nn.Module, image_size: tuple[int, int] | int | None = None) -> StageTaps:
    """Detects the model's family, hooks its 4 stages and probes their layouts.

    Args:
        model: A transformers classifier of a :data:`SUPPORTED_TEACHERS` family (or its base model), or a timm
            model of a :data:`SUPPORTED_STUDENTS` family.
        image_size: Input size of the probe forward, ``(H, W)`` or a side. Default: the model's own input size
            (timm ``patch_embed.img_size`` / ``pretrained_cfg``, transformers ``config.image_size``, else 224).

    Returns:
        The installed taps, with ``output_specs`` and ``input_specs`` measured by one no-grad forward in eval
        mode (the training flags of all modules are restored afterwards).

    Raises:
        ValueError: The architecture is not supported (the message names the supported families).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) if config is not None else None
    size = _pair(image_size) if image_size is not None else None
    if model_type in _HF_FAMILIES:
        family = _HF_FAMILIES[model_type]
        if family == "hf_timm_wrapper":
            inner = getattr(model, "timm_model", None)
            inner_family = _timm_family(inner) if inner is not None else None
            if inner_family is None:
                raise _unsupported(inner if inner is not None else model)
            size = size or _timm_image_size(inner)
            sites = _timm_sites(inner, inner_family, size)
            family = f"{family}:{inner_family}"
        else:
            if size is None:
                config_size = getattr(config, "image_size", None)
                size = _pair(config_size) if config_size is not None else (224, 224)
            sites = _hf_sites(model, family, size)
        in_channels = int(getattr(config, "num_channels", 0) or _first_conv_channels(model) or 3)
    else:
        family = _timm_family(model)
        if family is None:
            raise _unsupported(model)
        size = size or _timm_image_size(model)
        sites = _timm_sites(model, family, size)
        in_channels = _first_conv_channels(model) or 3
    taps = StageTaps(family, sites)
    try:
        taps.blocks = _block_modules(model, family)
        taps._run_probe(model, size, in_channels)
    except BaseException:
        taps.remove()
        raise
    return taps
