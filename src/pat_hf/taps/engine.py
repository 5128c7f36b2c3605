"""The hook engine: :class:`StageTaps` (forward hooks reading and rewriting the 4 stage features, the probe
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
    _unsupported,
)
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
