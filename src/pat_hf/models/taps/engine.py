"""The hook engine: :class:`StageTaps` (forward hooks reading and rewriting the stage features, the probe
forward measuring their layouts), the hook factories, and :func:`build_taps`, which puts it all together.

Imports :mod:`.layout` and :mod:`.families` from the package; nothing in the package imports it but ``__init__``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .families import (
    _HF_FAMILIES,
    _HIDDEN_KWARGS,
    _block_modules,
    _first_conv_channels,
    _hf_sites,
    _pair,
    _timm_family,
    _timm_image_size,
    _timm_sites,
)
from .generic import NoStagesError, hf_generic_sites, timm_generic_sites
from .layout import NUM_STAGES, StageSpec, _Site, map_to_tokens, tokens_to_map

# --------------------------------------------------------------------------------------------------------------
# Stage taps
# --------------------------------------------------------------------------------------------------------------


def _hf_swin_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
    if dims is None:
        raise RuntimeError("hf_swin: the hooked module was called without input_dimensions")
    return int(dims[0]), int(dims[1])


class StageTaps:
    """Forward hooks on a model's stage modules, 1 to 4 (no monkey-patching of any class, no forward rewriting).

    Build it with :func:`build_taps`. Stages are indexed 0..num_stages-1.

    Attributes:
        family: The rule that found the stages, e.g. ``"hf_vit"``, ``"timm_resnet"``, ``"timm_generic"``,
            ``"hf_generic"``, ``"hf_timm_wrapper:timm_generic"`` (internal; messages name the model instead).
        model_name: The model, as messages name it.
        num_stages: The number of stages (1 to 4).
        convolutional: Whether every stage is a convolutional map (timm Swin's NHWC maps and tokens are not).
        blocks: The model's residual blocks in forward order (what PAT can recompute in the backward).
        output_specs: Layout of each stage's output, in canonical layout (``num_stages`` entries).
        input_specs: Layout of each stage's input as a ``"map"`` spec of its patch grid (prefix tokens excluded);
            None for a stage whose input no module gives (no prompt can go there).

    The hooks hold only weak references to the taps and to the hooked modules, and do nothing when fired on a
    different module: a ``copy.deepcopy`` of a tapped model (e.g. an EMA copy) behaves as an untapped model.
    Call :meth:`remove` before pickling a whole tapped model.
    """

    family: str
    output_specs: list[StageSpec]
    input_specs: list[StageSpec]
    blocks: list[nn.Module]

    def __init__(self, family: str, sites: list[_Site], model_name: str | None = None) -> None:
        if not 1 <= len(sites) <= NUM_STAGES:
            raise ValueError(f"expected 1 to {NUM_STAGES} stage sites, got {len(sites)}")
        self.family = family
        self.model_name = model_name or family
        self.num_stages = len(sites)
        # Whether map features are convolutional maps (False: transformer tokens laid out as a map, timm Swin).
        self.convolutional = all(site.layout == "map" for site in sites)
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
        # Module -> (stages whose output it gives, stages whose input is its output).
        outputs: dict[int, tuple[nn.Module, list[int], list[int]]] = {}
        for index, site in enumerate(self._sites):
            if site.in_module is not None and site.in_hook == "pre":
                inputs.setdefault(id(site.in_module), (site.in_module, []))[1].append(index)
            elif site.in_module is not None:
                outputs.setdefault(id(site.in_module), (site.in_module, [], []))[2].append(index)
            outputs.setdefault(id(site.out_module), (site.out_module, [], []))[1].append(index)
        taps_ref = weakref.ref(self)
        for module, stages in inputs.values():
            hook = _make_pre_hook(taps_ref, weakref.ref(module), tuple(stages))
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, stages, rewritten in outputs.values():
            hook = _make_post_hook(taps_ref, weakref.ref(module), tuple(stages), tuple(rewritten))
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _token_grid(self, grid: tuple[int, int] | None, num_patches: int) -> tuple[int, int]:
        if grid is not None and grid[0] * grid[1] == num_patches:
            return grid
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
        new_x = self._rewrite_input(stages, active, x, args, kwargs)
        if new_x is None:
            return None
        if args:
            return (new_x, *args[1:]), kwargs
        return args, {**kwargs, key: new_x}

    def _rewrite_input(
        self, stages: tuple[int, ...], active: list[int], x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        """The stage input ``x`` with the active transforms applied (None when none is); records the probe's spec."""
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
        return new_x

    def _stage_input_from_output(self, stages: tuple[int, ...], output: object) -> object:
        """Rewrites a module's output that is the input of ``stages`` (forward hook); None keeps it."""
        active = [i for i in stages if i in self._transforms]
        if self._probe is None and not active:
            return None
        x = output if isinstance(output, torch.Tensor) else output[0]
        new_x = self._rewrite_input(stages, active, x, (), {})
        if new_x is None:
            return None
        if isinstance(output, torch.Tensor):
            return new_x
        return type(output)((new_x, *output[1:])) if isinstance(output, tuple) else [new_x, *output[1:]]

    def _input_to_map(
        self, site: _Site, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The stage input as a (B, C, H, W) map, and the function putting a map back in the input's layout."""
        layout, prefix_tokens, grid = site.input_layout()
        if layout == "map":
            return x, lambda m: m
        if layout == "nhwc":
            return x.permute(0, 3, 1, 2), lambda m: m.permute(0, 2, 3, 1)
        if layout == "hf_swin":
            height, width = _hf_swin_grid(args, kwargs)
            feature_map, _ = tokens_to_map(x, 0, height, width)
            return feature_map, map_to_tokens
        height, width = self._token_grid(grid, x.shape[1] - prefix_tokens)
        feature_map, prefix = tokens_to_map(x, prefix_tokens, height, width)
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
                    grid = self._token_grid(site.grid, feature.shape[1] - prefix)
                spec = StageSpec("tokens", feature.shape[2], grid[0], grid[1], prefix)
                if spec.shape(feature.shape[0]) != tuple(feature.shape):
                    raise RuntimeError(f"{self.family}: stage output {tuple(feature.shape)} does not match {spec}")
            for i in stages:
                self._probe["out"][i] = spec
        if self._sinks:
            sink = self._sinks[-1]
            if len(sink) < self.num_stages:
                sink.extend([None] * (self.num_stages - len(sink)))
            for i in stages:
                sink[i] = feature

    # -- public API ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Captures the stage outputs of every forward run inside the block.

        After a forward, the yielded list holds ``num_stages`` tensors, entry ``i`` being stage ``i``'s output of the most
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
            transforms: Stage index (0..num_stages-1) to a callable receiving the stage input's patch grid as a map
                (B, C, H, W) and returning a map of the same shape. Prefix tokens bypass it unchanged; the taps
                convert tokens and NHWC inputs to and from the map. ``None`` (or ``{}``) removes all transforms.
                Stages that share a block (models with fewer than 4 blocks or stages) apply theirs in order.

        Raises:
            ValueError: On a stage index outside 0..num_stages-1 or a non-callable transform.
        """
        transforms = dict(transforms or {})
        for index, transform in transforms.items():
            if not isinstance(index, int) or not 0 <= index < self.num_stages:
                raise ValueError(f"stage indices are 0..{self.num_stages - 1}, got {index!r}")
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
        """One no-grad forward in eval mode (no batch-statistics update, no dropout) to read the specs."""
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
        missing = [i for i in range(self.num_stages) if i not in probe["out"]]
        missing += [i for i, site in enumerate(self._sites) if site.in_module is not None and i not in probe["in"]]
        if missing:
            raise RuntimeError(f"{self.model_name}: the probe forward did not run stage(s) {sorted(set(missing))}")
        # A stage without an input site (no module gives its input) has no input spec: no prompt can go there.
        self.input_specs = [probe["in"].get(i) for i in range(self.num_stages)]
        self.output_specs = [probe["out"][i] for i in range(self.num_stages)]


def _make_pre_hook(taps_ref: weakref.ref, module_ref: weakref.ref, stages: tuple[int, ...]) -> Callable:
    # A plain closure over weak references: deepcopy treats functions as atomic, so a copied model keeps this
    # very hook, which must then ignore the copy's module (identity check) and never keep the taps alive.
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        taps = taps_ref()
        if taps is None or module is not module_ref():
            return None
        return taps._stage_input(stages, args, kwargs)

    return hook


def _make_post_hook(
    taps_ref: weakref.ref, module_ref: weakref.ref, stages: tuple[int, ...], rewritten: tuple[int, ...] = ()
) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        taps = taps_ref()
        if taps is None or module is not module_ref():
            return None
        # Read first: a stage's output is read before the next stage's prompt rewrites the same tensor.
        if stages:
            taps._stage_output(stages, args, kwargs, output)
        if rewritten:
            return taps._stage_input_from_output(rewritten, output)
        return None

    return hook


LOGIT_METHODS = ("kd", "dkd", "dist")
"""Methods that read only logits: they work with any model, stage taps or not."""


def _no_stages_error(model: nn.Module, reason: str) -> ValueError:
    name = _model_name(model)
    return ValueError(
        f"Cannot find the stage features of {name} ({reason}), so the feature methods (pat, ofa, fitnet) cannot "
        f"use it. The logit methods work with it: {', '.join(LOGIT_METHODS)} (distill_method=...)."
    )


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    architecture = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or "")
    if architecture:
        return f"the timm model {architecture!r} ({type(model).__name__})"
    model_type = getattr(config, "model_type", None)
    if model_type == "timm_wrapper" and getattr(model, "timm_model", None) is not None:
        return f"the TimmWrapper teacher around {_model_name(model.timm_model)}"
    if model_type:
        return f"the transformers model {type(model).__name__} (model_type {model_type!r})"
    return f"the model {type(model).__name__}"


def _is_swin_like(model: nn.Module) -> bool:
    """transformers models built as Swin (Swin, Swin V2, Donut-Swin): encoder stages that run their blocks and
    THEN their own downsampling, so their hidden states come after the next stage's downsampling."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return False
    return all(hasattr(stage, "blocks") and hasattr(stage, "downsample") for stage in layers)


def build_taps(model: nn.Module, image_size: tuple[int, int] | int | None = None) -> StageTaps:
    """Finds the model's stages (up to 4), hooks them and probes their layouts.

    A family rule is used where the generic one is measurably wrong or the paper fixes the stages (see
    :mod:`.families`); every other model gets the generic sites of :mod:`.generic`: timm models from
    ``feature_info``, transformers classifiers from their hidden states.

    Args:
        model: A transformers image classifier (or its base model), or a timm model.
        image_size: Input size of the probe forward, ``(H, W)`` or a side. Default: the model's own input size
            (timm ``patch_embed.img_size`` / ``pretrained_cfg``, transformers ``config.image_size``, else 224).

    Returns:
        The installed taps, with ``output_specs`` and ``input_specs`` measured by one no-grad forward in eval
        mode (the training flags of all modules are restored afterwards).

    Raises:
        ValueError: No stage feature can be found (the message names the model and the methods that work).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) if config is not None else None
    size = _pair(image_size) if image_size is not None else None
    try:
        if config is not None and model_type is not None:
            if model_type == "timm_wrapper":
                inner = getattr(model, "timm_model", None)
                if inner is None:
                    raise NoStagesError("a TimmWrapper without its timm_model")
                size = size or _timm_image_size(inner)
                in_channels = _first_conv_channels(model) or 3
                inner_family = _timm_family(inner)
                if inner_family is not None:
                    sites = _timm_sites(inner, inner_family, size)
                else:
                    inner_family = "timm_generic"
                    sites = timm_generic_sites(inner, size, in_channels)
                family = f"hf_timm_wrapper:{inner_family}"
            else:
                if size is None:
                    config_size = getattr(config, "image_size", None)
                    size = _pair(config_size) if config_size is not None else (224, 224)
                in_channels = int(getattr(config, "num_channels", 0) or _first_conv_channels(model) or 3)
                family = _HF_FAMILIES.get(model_type)
                if family is None and _is_swin_like(model):
                    family = "hf_swin"
                if family is not None:
                    sites = _hf_sites(model, family, size)
                else:
                    family = "hf_generic"
                    sites = hf_generic_sites(model, size, in_channels)
        else:
            size = size or _timm_image_size(model)
            in_channels = _first_conv_channels(model) or 3
            family = _timm_family(model)
            if family is not None:
                sites = _timm_sites(model, family, size)
            else:
                family = "timm_generic"
                sites = timm_generic_sites(model, size, in_channels)
    except NoStagesError as error:
        raise _no_stages_error(model, str(error).split(": ", 1)[-1]) from None
    taps = StageTaps(family, sites, model_name=_model_name(model))
    try:
        taps.blocks = _block_modules(model, family)
        taps._run_probe(model, size, in_channels)
    except BaseException:
        taps.remove()
        raise
    return taps
